"""Checks of a cache against the model's own state."""
from __future__ import annotations

import torch

from hcache_adapter.compat import cache_kwarg, new_cache


def assert_holds_models_state(model, cache, tokens: torch.Tensor, atol: float) -> None:
    """`cache` holds the K/V the model's own prefill of `tokens` leaves, every layer, within `atol`."""
    ref = new_cache(model)
    with torch.no_grad():
        model(tokens, use_cache=True, **{cache_kwarg(model): ref})
    for mine, theirs in zip(cache.layers, ref.layers, strict=True):
        assert torch.allclose(mine.keys, theirs.keys, atol=atol)
        assert torch.allclose(mine.values, theirs.values, atol=atol)

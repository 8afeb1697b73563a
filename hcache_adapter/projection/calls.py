"""How a model calls its decoder layers for T positions, learned from the model's own forward.

A decoder layer's forward takes, besides the hidden state, whatever the model
computed for it once per forward: rotary tables (one for all layers, or one per
layer type, partial or full width), masks (per layer type), position ids,
ALiBi biases, the cache.  Re-deriving those per family is what the generic
projection must not do, so `record_layer_calls` asks the model: it runs the
base model's forward on placeholder token ids with every decoder layer's
``forward`` stubbed out, and each stub records the arguments it was called
with.  The stubs return their input, so no layer computes anything; the pass
costs an embedding lookup plus the model's own rotary and mask work, once per
restore (the same tables then serve every layer).

The token ids are placeholders: a model whose layer arguments depend on the
token ids themselves (per-layer token embeddings) is caught by the probe in
``support.py``, which compares the projection with the model's real cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hcache_adapter.compat import cache_kwarg
from hcache_adapter.forwards import own_forward, put_back_forward


class _Recorded(Exception):
    """Ends the recording forward once the last decoder layer has been reached."""


@dataclass(frozen=True)
class LayerCall:
    """The arguments one decoder layer was called with, minus its hidden state."""

    args: tuple[Any, ...]  # positional arguments after the hidden state
    kwargs: dict[str, Any]
    hidden_by_name: bool  # the hidden state came as ``hidden_states=`` rather than first positional

    def call(self, layer: nn.Module, hidden: Tensor) -> Any:
        if self.hidden_by_name:
            return layer(*self.args, hidden_states=hidden, **self.kwargs)
        return layer(hidden, *self.args, **self.kwargs)


def hidden_of_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The hidden state of a decoder layer's call: first positional, or ``hidden_states=``."""
    if args:
        return args[0]
    return kwargs.get("hidden_states")


def accepts(module: nn.Module, name: str) -> bool:
    """Whether `module.forward` takes a keyword `name` (or ``**kwargs``)."""
    params = inspect.signature(module.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def record_layer_calls(
    base_model: nn.Module,
    layers: Sequence[nn.Module],
    cache: Any,
    batch: int,
    position_ids: Tensor,
    device: torch.device,
    output_arity: Sequence[int],
) -> list[LayerCall]:
    """Each decoder layer's call for `position_ids` (``[batch, T]``), as the model's forward makes it.

    `cache` is passed to the forward as the model's cache (the layers' calls then
    carry it); `output_arity[i]` says what layer i returns (0: a tensor, n: a tuple
    of n), so that its stub returns the same shape of thing (the hidden state first).
    """
    calls: list[LayerCall | None] = [None] * len(layers)
    last = len(layers) - 1

    def stub(i: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = hidden_of_call(args, kwargs)
            by_name = not args
            kwargs = dict(kwargs)
            if by_name:
                kwargs.pop("hidden_states")
            calls[i] = LayerCall(tuple(args[1:]), kwargs, by_name)
            if i == last:
                raise _Recorded
            return hidden if not output_arity[i] else (hidden,) + (None,) * (output_arity[i] - 1)

        return forward

    # What the instances had of their own (an accelerate hook, a saver's wrapper) is put back afterwards.
    own = [own_forward(layer) for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    t = position_ids.shape[-1]
    ids = torch.zeros(batch, t, dtype=torch.long, device=device)
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": True, cache_kwarg(base_model): cache}
    if accepts(base_model, "position_ids"):
        inputs["position_ids"] = position_ids
    try:
        with torch.no_grad():
            base_model(**inputs)
    except _Recorded:
        pass
    finally:
        for layer, previous in zip(layers, own):
            put_back_forward(layer, previous)
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"the model's forward did not call decoder layers {missing}")
    return calls  # type: ignore[return-value]

"""The few places where transformers 5.x versions differ, kept in one module.

5.17 passes the cache as `past_key_values`; later 5.x name it `cache` (the old
name still works, with a deprecation warning). Cache layers are filled through
their own `update` except the plain DynamicLayer, where we hand over our
tensors directly to avoid a copy of the whole restored state.
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@functools.lru_cache(maxsize=None)
def _cache_kwarg_for(forward_qualname: str, params: tuple[str, ...]) -> str:
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which `model.forward` and `model.generate` take a Cache."""
    params = tuple(inspect.signature(model.forward).parameters)
    return _cache_kwarg_for(type(model).__qualname__, params)


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty DynamicCache laid out for this model (sliding layers where the config has them)."""
    return DynamicCache(config=model.config)


def fill_layer(cache: DynamicCache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put restored K/V ([B, kv_heads, T, head_dim]) into an empty cache layer."""
    layer = cache.layers[layer_idx]
    if type(layer) is DynamicLayer:
        if not layer.is_initialized:
            # lazy_initialization makes two empty tensors on the keys' device, which on a GPU costs
            # a host-to-device call each (~70 us a layer on the lent H100); on meta it is free.
            layer.lazy_initialization(keys.new_empty(0, device="meta"), values.new_empty(0, device="meta"))
            layer.device = keys.device
        layer.keys, layer.values = keys, values
    else:
        layer.update(keys, values)


def layer_kv(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The K/V tensors a cache layer holds, or None when it holds none."""
    if layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    keys = getattr(layer, "keys", None)
    if keys is None or not getattr(layer, "is_initialized", True) or keys.numel() == 0:
        return None
    return keys, layer.values


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length() if len(cache.layers) else 0


@functools.lru_cache(maxsize=None)
def chunked_prefill_respects_cache() -> bool:
    """Whether generate()'s chunked prefill (`prefill_chunk_size`) starts after what a given cache holds.

    5.17 splits the whole prompt into chunks from position 0 whatever the cache
    holds (the restored prefix would be fed twice); later 5.x slice off the cached
    tokens first. Read off the installed code; unknown counts as no.
    """
    from transformers.generation.utils import GenerationMixin

    prefill = getattr(GenerationMixin, "_prefill", None)
    try:
        source = inspect.getsource(prefill) if prefill is not None else ""
    except (OSError, TypeError):
        return False
    chunked = source.split("chunk_size = generation_config.prefill_chunk_size", 1)
    return len(chunked) == 2 and "next_sequence_length" in chunked[1].split("torch.split", 1)[0]


def causal_lm_output(logits: torch.Tensor, cache):
    """A CausalLMOutputWithPast holding `cache` under this version's field name (`cache` from 5.2x, else
    `past_key_values`), as generate() reads it back."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(logits=logits, **{field: cache})


def generate_positions(model, start: int, end: int, device) -> dict:
    """The `position_ids` generate() passes for tokens start..end-1 of an unpadded prompt, as a forward kwarg of
    `model.base_model` ({} when generate passes none). Some models' own default differs (RoBERTa counts from
    padding_idx + 1), and state computed outside generate() must be the state generate() would have built."""
    if getattr(model.config, "is_encoder_decoder", False) or not (
            _takes_position_ids(type(model)) and _takes_position_ids(type(model.base_model))):
        return {}
    return {"position_ids": torch.arange(start, end, device=device).unsqueeze(0)}


@functools.lru_cache(maxsize=None)
def _takes_position_ids(cls: type) -> bool:
    """Whether `cls.forward` takes `position_ids` (per class, once: restores call this on their path)."""
    return "position_ids" in inspect.signature(cls.forward).parameters

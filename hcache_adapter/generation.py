"""What a `generate()` call asks for, as far as restoring and saving state are concerned.

`hc.generate` takes exactly `model.generate`'s arguments. Most calls can start
from a restored prefix: greedy and sampled decoding, beam search and several
return sequences (the prefix is restored once and repeated per beam), assisted
decoding (the main model's cache), and the cache implementations
transformers offers ("dynamic", "static" — its compiled fast path —,
"offloaded"). Batches of several sequences, left padded as decoder-only
batches are, restore a prefix per row (`serving.batch`; `pads` says where each
row starts). A few cannot, and go to the model untouched: a cache the caller
passes (respected, with a debug log), `inputs_embeds`, a quantized cache,
`use_cache=False`, prompts masked other than by left padding, and assisted
decoding of a batch (which transformers does not run).
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from hcache_adapter.compat import chunked_prefill_respects_cache
from hcache_adapter.serving.rows import left_padding

log = logging.getLogger(__name__)

STATIC_IMPLEMENTATIONS = ("static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked",
                          "offloaded_hybrid", "offloaded_hybrid_chunked")
DYNAMIC_IMPLEMENTATIONS = (None, "dynamic", "offloaded")
SPECULATIVE_ARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "assistant_tokenizer")


@dataclass(frozen=True)
class GenerateCall:
    """The parts of a generate() call that decide how HCache serves it."""

    restorable: bool
    reason: str = ""  # why not, when not
    cache_implementation: str | None = None
    expand: int = 1  # rows per prompt row: beams, or return sequences when sampling
    max_length: int = 0  # prompt + new tokens: what a static cache must hold
    speculative: bool = False  # assisted / prompt-lookup decoding: forwards of drafts that may be rolled back
    pads: tuple[int, ...] | None = None  # a batch (or a left-padded row): masked leading columns per row

    @property
    def batched(self) -> bool:
        """Whether rows are restored one by one and laid out left padded (`serving.batch`)."""
        return self.pads is not None

    @property
    def save_after_prefill(self) -> bool:
        """Whether only the prompt's state can be saved: later forwards are beams that diverge or drafts
        that may be rolled back (a chunk saved from them could hold tokens the output does not)."""
        return self.expand > 1 or self.speculative

    @property
    def static(self) -> bool:
        return self.cache_implementation in STATIC_IMPLEMENTATIONS

    @property
    def offloaded(self) -> bool:
        return self.cache_implementation is not None and "offloaded" in self.cache_implementation

    @property
    def lazy(self) -> bool:
        """Whether the restored layers may be made ready under generate()'s own prefill."""
        return not self.static and not self.offloaded and self.expand == 1


def inspect_call(model: torch.nn.Module, input_ids: Any, kwargs: dict, prompt: list[int] | None = None) -> GenerateCall:
    """Classify a `generate(input_ids, **kwargs)` call for `model` (`prompt`: input_ids[0] on the host)."""
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        return GenerateCall(False, "the caller passed a cache: it is used as given, nothing is restored")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return GenerateCall(False, "input_ids is not a [batch, tokens] tensor")
    if kwargs.get("inputs_embeds") is not None:
        return GenerateCall(False, "inputs_embeds: the state is not keyed by token ids")
    gc = copy.copy(kwargs.get("generation_config") or model.generation_config)
    gc.update(**{k: v for k, v in kwargs.items() if hasattr(gc, k)})
    if gc.use_cache is False:
        return GenerateCall(False, "use_cache=False")
    if getattr(gc, "prefill_chunk_size", None) and not chunked_prefill_respects_cache():
        return GenerateCall(False, "this transformers' chunked prefill ignores a restored cache")
    pads = None
    if input_ids.shape[0] != 1 or _masked(kwargs.get("attention_mask"), gc, prompt):
        pads = _left_padding(kwargs.get("attention_mask"), gc, input_ids)
        if pads is None:
            return GenerateCall(False, "part of the prompt is masked other than by left padding: its state "
                                       "depends on the mask, not on the tokens alone")
    impl = gc.cache_implementation
    if impl not in DYNAMIC_IMPLEMENTATIONS and impl not in STATIC_IMPLEMENTATIONS:
        return GenerateCall(False, f"cache_implementation={impl!r} is not restored into")
    beams = gc.num_beams or 1
    expand = beams if beams > 1 else (gc.num_return_sequences or 1)
    if gc.max_new_tokens is not None:
        max_length = input_ids.shape[1] + gc.max_new_tokens
    else:
        max_length = gc.max_length or input_ids.shape[1]
    if getattr(gc, "max_cache_len", None):
        max_length = max(max_length, gc.max_cache_len)
    speculative = any(kwargs.get(k) is not None for k in SPECULATIVE_ARGS) or bool(
        getattr(gc, "prompt_lookup_num_tokens", None))
    if pads is not None and speculative:
        return GenerateCall(False, "assisted decoding of a batch or of a padded prompt")
    return GenerateCall(True, "", impl, expand, max_length, speculative, pads)


def _masked(mask, gc, prompt: list[int] | None) -> bool:
    """Whether generate() will mask some prompt position: a given mask with zeros, or (as generate infers
    one) a pad token in the prompt that is not also the end-of-sequence token."""
    if mask is not None:
        return not bool(torch.as_tensor(mask).all())
    pad = gc.pad_token_id
    if pad is None or prompt is None:
        return False
    pads = set(pad) if isinstance(pad, (list, tuple)) else {pad}
    eos = gc.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return not (pads & eos) and any(t in pads for t in prompt)


def _left_padding(mask, gc, input_ids: torch.Tensor) -> tuple[int, ...] | None:
    """Each row's leading masked columns under the mask generate() will use (given, or inferred from pad
    tokens the way generate() infers it); None when some row is masked other than on its left."""
    if mask is None:
        pad = gc.pad_token_id
        pads = set(pad) if isinstance(pad, (list, tuple)) else ({pad} if pad is not None else set())
        eos = gc.eos_token_id
        eos = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        rows = input_ids.tolist()
        infer = bool(pads) and not (pads & eos) and any(t in pads for row in rows for t in row)
        mask_rows = [[int(t not in pads) for t in row] if infer else [1] * len(row) for row in rows]
    else:
        mask_rows = torch.as_tensor(mask).tolist()
    found = left_padding(mask_rows)
    return tuple(found) if found is not None else None


@contextmanager
def with_cache(model: torch.nn.Module, kwargs: dict, cache_kwarg: str, cache):
    """`kwargs` for model.generate with `cache` in place of the cache generate() would make itself.

    generate() refuses a cache together with a cache_implementation, from the
    call, from a generation_config passed in, or from the model's own
    generation_config (5.24 fills unset fields from it): the implementation was
    honoured by building `cache`, so it is dropped from all three while the call
    runs, and the model's config is put back as it was.
    """
    out = dict(kwargs)
    out.pop("cache_implementation", None)
    gc = out.get("generation_config")
    if gc is not None and gc.cache_implementation is not None:
        gc = copy.deepcopy(gc)
        gc.cache_implementation = None
        out["generation_config"] = gc
    out[cache_kwarg] = cache
    own = model.generation_config
    saved = own.cache_implementation
    own.cache_implementation = None
    try:
        yield out
    finally:
        own.cache_implementation = saved


def cache_for_call(call: GenerateCall, model: torch.nn.Module, restored, previous_static_len: int = 0):
    """The restored cache in the form the call asked for: repeated per beam, static, or offloaded."""
    from transformers import DynamicCache, StaticCache

    from hcache_adapter.compat import fill_layer, layer_kv

    cache = restored
    if call.expand > 1:  # before any conversion: a static cache is allocated for the expanded batch
        cache.batch_repeat_interleave(call.expand)
    if call.static:
        length = max(call.max_length, previous_static_len)
        static = StaticCache(config=model.config, max_cache_len=length, offloading=call.offloaded)
        for l in range(len(static.layers)):
            kv = layer_kv(cache, l)
            if kv is not None:
                static.layers[l].update(*kv)  # the layer's own write: lazy allocation, positions 0..n-1
        cache = static
    elif call.offloaded:
        offloaded = DynamicCache(config=model.config, offloading=True)
        for l in range(len(offloaded.layers)):
            kv = layer_kv(cache, l)
            if kv is not None:
                fill_layer(offloaded, l, *kv)
        cache = offloaded
    return cache

"""The first forward of generate() over a restored prefix, replayed from a CUDA graph.

After a restore, generate() prefills the new tokens (a few dozen) on top of the
prefix. Its GPU work is small (the weights, read once), but issuing it from
Python costs a kernel launch and more per op: ~20-25 ms for a 7B model on a
launch-bound host, as much as the restore itself. Here that forward is
captured once per length bucket and replayed:

* static shapes: the new tokens are padded to a suffix bucket (a power of two,
  at least 16) and the cache to a total bucket (`bucket_rows`); the new tokens
  are written at positions n.. of a static cache, so padding rows sit after the
  real ones and causality alone keeps them out of every real row's attention;
  positions past n + s are masked by the same causal mask;
* the model's own forward runs under capture: its embedding, rotary, layers and
  head, with a float additive 4D mask built inside the graph from the positions
  (transformers passes a 4D mask through as is) and a static cache layer that
  writes with `index_copy_` at those positions;
* each layer's input hidden state is copied out inside the graph, so the state
  saver gets what its hooks would have seen (hooks do not run on replay);
* after a replay the restored cache's layers hold their K/V (prefix and new
  tokens) in graph memory lazily: copied out when something first reads them.

A bucket is captured on its second use (one eager run first), a few are kept.
On a CPU the same static path runs eagerly (`capture=False`): it is how its
logic is tested against `model.generate`. Anything unusual (another attention
implementation, sliding-window layers, a mask, output options, a capture
failure) runs the model's own forward instead.
"""
from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hcache_adapter.compat import causal_lm_output
from hcache_adapter.lazycache import LazyCache, LazyLayer
from hcache_adapter.projection.graphs import bucket_rows

log = logging.getLogger(__name__)

MIN_SUFFIX = 16
_EXPECTED_KWARGS = {"input_ids", "attention_mask", "position_ids", "use_cache", "logits_to_keep", "return_dict",
                    "output_attentions", "output_hidden_states", "cache_position"}


def suffix_bucket(s: int) -> int:
    """Rows the new tokens are padded to: the next power of two, at least MIN_SUFFIX."""
    return max(MIN_SUFFIX, 1 << (max(s, 1) - 1).bit_length())


class GraphLayer(CacheLayerMixin):
    """A static cache layer that writes new K/V at the positions in a shared tensor (graph-safe)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_pos: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.write_pos = keys, values, write_pos
        self.dtype, self.device = keys.dtype, keys.device
        self.length = 0  # positions holding real state (host side, for callers that ask)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.write_pos, key_states)
        self.values.index_copy_(2, self.write_pos, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


@dataclass
class _Bucket:
    suffix: int
    total: int
    ids: torch.Tensor  # [1, suffix]
    base: torch.Tensor  # arange(suffix)
    pos: torch.Tensor  # [1, suffix]: n .. n + suffix - 1
    kv_index: torch.Tensor  # arange(total)
    idx: torch.Tensor  # [1]: the row whose logits generate() keeps
    cache: Cache
    hidden: dict[int, torch.Tensor]  # layer -> [1, suffix, D]: its input, copied out by the forward
    logits: torch.Tensor | None = None
    graph: object = None
    asked: int = 0
    pool: object = None
    borrowers: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # caches whose layers may point here


class _GraphSlice:
    """LayerSource for the K/V a replay left in a bucket's static cache: copied out on first read."""

    def __init__(self, bucket: _Bucket, rows: int):
        self.bucket, self.rows = bucket, rows

    def take(self, layer: int):
        layer_cache = self.bucket.cache.layers[layer]
        return (layer_cache.keys[..., : self.rows, :].clone(), layer_cache.values[..., : self.rows, :].clone())


class CapturedPrefill:
    """Runs generate()'s first forward over a restored prefix from per-bucket CUDA graphs."""

    def __init__(self, model: torch.nn.Module, decoder_layers: list[torch.nn.Module], cache_kwarg: str, internal, *,
                 capture: bool | None = None, max_buckets: int = 1):
        """`internal`: the flag that makes the state saver ignore the forwards run here to warm up and capture."""
        self.model = model
        self.decoder_layers = decoder_layers
        self.cache_kwarg = cache_kwarg
        self.internal = internal
        self.device = next(model.parameters()).device
        self.capture = (self.device.type == "cuda") if capture is None else capture
        self.max_buckets = max_buckets
        self.enabled = self.supported(model)
        self._buckets: OrderedDict[tuple[int, int], _Bucket] = OrderedDict()
        self.runs = 0  # first forwards served here (replayed, or run as the static forward on a CPU)
        self.replays = 0
        self.captures = 0

    @staticmethod
    def supported(model: torch.nn.Module) -> bool:
        """Models whose layers are all full attention under sdpa or eager attention (a 4D float mask)."""
        cfg = model.config
        if getattr(cfg, "_attn_implementation", "eager") not in ("sdpa", "eager"):
            return False
        if getattr(cfg, "sliding_window", None) is not None or getattr(cfg, "attention_chunk_size", None):
            return False
        types = getattr(cfg, "layer_types", None)
        if types is not None and any(t != "full_attention" for t in types):
            return False
        return not getattr(cfg, "is_encoder_decoder", False)

    def handler(self, cache: LazyCache, n: int, on_hidden: Callable[[torch.Tensor, dict], None] | None,
                hidden_layers: list[int]):
        """A `first_forward` handler for one generate() call over `cache` (n restored tokens).

        `on_hidden(ids, {layer: input hidden state})` receives, after a static run,
        what the saver's hooks would have seen for `hidden_layers`.
        """

        def run(forward, *args, **kwargs):
            ids = self._accepts(args, kwargs, cache, n)
            bucket = self._bucket(ids.shape[1], n, cache, hidden_layers) if ids is not None else None
            if bucket is None:
                return forward(*args, **kwargs)
            try:
                logits = self._run(bucket, ids, n, cache, forward)
            except Exception as e:  # a capture or replay problem must never break generate()
                log.warning("captured prefill failed (%s); using the model's own forward from now on", e)
                self.enabled = False
                self._buckets.clear()
                return forward(*args, **kwargs)
            s = ids.shape[1]
            if on_hidden is not None and hidden_layers:
                on_hidden(ids, {l: bucket.hidden[l][:, :s].clone() for l in hidden_layers})
            return causal_lm_output(logits, cache)

        return run

    # -- deciding ----------------------------------------------------------------
    def _accepts(self, args, kwargs, cache: LazyCache, n: int) -> torch.Tensor | None:
        if not self.enabled or args or kwargs.get(self.cache_kwarg) is not cache:
            return None
        if set(kwargs) - _EXPECTED_KWARGS - {self.cache_kwarg}:
            return None
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or kwargs.get("use_cache") is False:
            return None
        if kwargs.get("logits_to_keep") != 1:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            return None
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or cache.get_seq_length() != n:
            return None
        if not all(isinstance(layer, LazyLayer) for layer in cache.layers):
            return None
        return ids

    def _bucket(self, s: int, n: int, cache: LazyCache, hidden_layers: list[int]) -> _Bucket | None:
        key = (suffix_bucket(s), bucket_rows(n + suffix_bucket(s)))
        b = self._buckets.get(key)
        if b is None or set(b.hidden) != set(hidden_layers):
            while len(self._buckets) >= self.max_buckets:
                self._buckets.popitem(last=False)
            if not self._fits(key[1], cache):
                return None
            b = self._buckets[key] = self._new_bucket(*key, cache, hidden_layers)
        self._buckets.move_to_end(key)
        b.asked += 1
        if self.capture and b.asked < 2:
            return None  # a length seen once (a growing chat) is not worth a capture
        return b

    def _fits(self, total: int, cache: LazyCache) -> bool:
        """Whether a static cache of `total` rows leaves the GPU room: it takes at most half of what is free,
        so a long context runs the model's own forward instead of failing a capture out of memory."""
        if self.device.type != "cuda":
            return True
        need = sum(2 * layer.keys[0, :, :1].numel() * layer.keys.element_size() * total for layer in cache.layers)
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if need <= free // 2:
            return True
        log.info("captured prefill: a static cache of %d rows (%.1f GiB) does not fit in half of the free GPU "
                 "memory (%.1f GiB); the model's own forward runs", total, need / 2**30, free / 2**30)
        return False

    def _new_bucket(self, suffix: int, total: int, cache: LazyCache, hidden_layers: list[int]) -> _Bucket:
        dev = self.device
        dtype = next(self.model.parameters()).dtype
        cfg = self.model.config
        base = torch.arange(suffix, device=dev)
        pos = torch.zeros(1, suffix, dtype=torch.long, device=dev)
        layers = []
        for restored in cache.layers:  # shapes as the model caches them (the restored layers say)
            k, v = restored.keys, restored.values
            layers.append(GraphLayer(k.new_zeros(1, k.shape[1], total, k.shape[-1]),
                                     v.new_zeros(1, v.shape[1], total, v.shape[-1]), pos[0]))
        hidden = {l: torch.zeros(1, suffix, cfg.hidden_size, dtype=dtype, device=dev) for l in hidden_layers}
        return _Bucket(suffix, total, torch.zeros(1, suffix, dtype=torch.long, device=dev), base, pos,
                       torch.arange(total, device=dev), torch.zeros(1, dtype=torch.long, device=dev),
                       Cache(layers=layers), hidden)

    # -- running -----------------------------------------------------------------
    def _run(self, b: _Bucket, ids: torch.Tensor, n: int, cache: LazyCache, forward) -> torch.Tensor:
        s = ids.shape[1]
        self._release(b)
        b.ids[:, :s].copy_(ids)
        torch.add(b.base, n, out=b.pos[0])
        b.idx.fill_(s - 1)
        for l, layer in enumerate(cache.layers):  # the restored prefix into the static cache
            static = b.cache.layers[l]
            static.keys[:, :, :n].copy_(layer.keys)
            static.values[:, :, :n].copy_(layer.values)
            static.length = n + s
        if not self.capture:
            self._static_forward(b, forward)
        else:
            if b.graph is None:
                self._capture(b, forward)
            b.graph.replay()
            self.replays += 1
        self.runs += 1
        source = _GraphSlice(b, n + s)
        for layer in cache.layers:
            layer.defer(source, n + s)
        b.borrowers.add(cache)
        return b.logits.clone()

    def _static_forward(self, b: _Bucket, forward) -> None:
        """One forward of the bucket's static inputs; under capture it is what the graph records."""
        dtype = b.cache.layers[0].keys.dtype
        future = b.kv_index.view(1, 1, 1, -1) > b.pos.view(1, 1, -1, 1)
        mask = future.to(dtype) * torch.finfo(dtype).min
        hooks = [self.decoder_layers[l].register_forward_pre_hook(_copy_input(b.hidden[l]), with_kwargs=True)
                 for l in b.hidden]
        try:
            with self.internal.running():
                out = forward(input_ids=b.ids, position_ids=b.pos, attention_mask=mask, use_cache=True,
                              logits_to_keep=b.idx, return_dict=True, **{self.cache_kwarg: b.cache})
        finally:
            for h in hooks:
                h.remove()
        if b.logits is None:
            b.logits = torch.empty_like(out.logits)
        b.logits.copy_(out.logits)

    def _capture(self, b: _Bucket, forward) -> None:
        dev = self.device
        current = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm up off the graph (library handles, lazy buffers)
            self._static_forward(b, forward)
        current.wait_stream(side)
        # Not `torch.cuda.graph(...)`: its entry synchronizes, collects garbage and empties the
        # allocator's cache. thread_local: the store's and loader's threads may use CUDA meanwhile.
        capture = torch.cuda.Stream(device=dev)
        capture.wait_stream(current)
        g = torch.cuda.CUDAGraph()
        b.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(capture):
            g.capture_begin(pool=b.pool, capture_error_mode="thread_local")
            try:
                self._static_forward(b, forward)
            finally:
                g.capture_end()
        current.wait_stream(capture)
        b.graph = g
        self.captures += 1

    @staticmethod
    def _release(b: _Bucket) -> None:
        """Before the bucket's memory is written again, earlier caches copy out what they still point at."""
        for cache in b.borrowers:
            for layer in cache.layers:
                if isinstance(layer, LazyLayer) and not layer.ready:
                    layer.materialize()
        b.borrowers.clear()


def _copy_input(buf: torch.Tensor):
    def hook(module, args, kwargs):
        buf.copy_(args[0] if args else kwargs["hidden_states"])

    return hook


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
  tokens) in graph memory lazily: copied out when something first reads them;
* the forward is captured as a few graphs of `SEGMENT_LAYERS` decoder layers
  each (one memory pool, replayed in capture order), and each segment is
  replayed as soon as its layers' restored K/V are copied in: the first layers
  run while the restore is still loading the last ones, instead of the whole
  forward waiting for the whole restore.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hcache_adapter import split_attention
from hcache_adapter.capture_streams import CaptureStream
from hcache_adapter.compat import causal_lm_output
from hcache_adapter.fused_blocks import compiled_blocks
from hcache_adapter.lazycache import LazyCache, LazyLayer
from hcache_adapter.projection.graphs import bucket_rows

log = logging.getLogger(__name__)

MIN_SUFFIX = 16
CAPTURE_ON_USE = 2  # a length bucket is captured on this use (the first runs eagerly: a length seen once is not worth it)
SEGMENT_LAYERS = 4  # decoder layers per captured graph: the forward's tail after the restore is one segment
_EXPECTED_KWARGS = {"input_ids", "attention_mask", "position_ids", "use_cache", "logits_to_keep", "return_dict",
                    "output_attentions", "output_hidden_states", "cache_position"}


def segments(num_layers: int, per: int = SEGMENT_LAYERS) -> list[range]:
    """Decoder layers split into consecutive segments of `per` (the last may be shorter)."""
    per = max(1, per)
    return [range(a, min(a + per, num_layers)) for a in range(0, max(num_layers, 1), per)]


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
    graphs: list | None = None  # one per segment of decoder layers, replayed in order
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


class StaticDestination:
    """A bucket's static cache rows 0..n-1, handed to a restore as where each layer's K/V goes."""

    def __init__(self, bucket: _Bucket, n: int):
        self.bucket, self.n = bucket, n

    @property
    def capacity(self) -> int:
        """Rows of each layer a restore may write (past n: the new tokens' and padding rows, which the forward
        overwrites or masks), so a projection graph of a padded length writes its result in place."""
        return self.bucket.total

    def __call__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        layers = self.bucket.cache.layers
        if layer >= len(layers):
            return None
        static = layers[layer]
        return static.keys[:, :, : self.n], static.values[:, :, : self.n]

    def lend(self, cache) -> None:
        """`cache`'s layers now point into the bucket: copied out before the bucket is written again."""
        self.bucket.borrowers.add(cache)


class CapturedPrefill:
    """Runs generate()'s first forward over a restored prefix from per-bucket CUDA graphs."""

    def __init__(self, model: torch.nn.Module, decoder_layers: list[torch.nn.Module], cache_kwarg: str, internal, *,
                 capture: bool | None = None, max_buckets: int = 1, segment_layers: int = SEGMENT_LAYERS,
                 attention: str | None = "auto", high_priority: bool = True, compile_blocks: bool = True):
        """`internal`: the flag that makes the state saver ignore the forwards run here to warm up and capture.
        `segment_layers`: decoder layers per captured graph (see the module doc). `attention`: the attention
        implementation the static forward runs (None: the model's own; "auto": split-KV attention
        when capturing on a GPU, eager otherwise). A fused kernel over a few dozen queries runs one
        block per head and leaves most of the GPU idle; eager attention spreads but moves the float32 scores
        several times; split-KV (`split_attention`) does neither. Measured on the H200: the 7B/16K forward's
        graphs 14.55 -> 12.51 ms of GPU time, TTFT unchanged within the runs' spread.
        `high_priority`: replay on a stream of the highest priority (see `_replay_stream`). `compile_blocks`:
        capture the layers' norms, MLPs and rotary compiled (`compiled_blocks`; only when capturing)."""
        self.model = model
        self.decoder_layers = decoder_layers
        self.cache_kwarg = cache_kwarg
        self.internal = internal
        self.device = next(model.parameters()).device
        self.capture = (self.device.type == "cuda") if capture is None else capture
        self.max_buckets = max_buckets
        self.segment_layers = segment_layers
        self.attention = attention if attention != "auto" else (split_attention.NAME if self.capture else "eager")
        self.high_priority = high_priority
        self.compile_blocks = compile_blocks
        self._stream: torch.cuda.Stream | None = None
        self.enabled = self.supported(model)
        self._buckets: OrderedDict[tuple[int, int], _Bucket] = OrderedDict()
        self.runs = 0  # first forwards served here (replayed, or run as the static forward on a CPU)
        self.in_place = 0  # layers a restore wrote straight into the static cache (no copy in)
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

    def destination(self, n: int, s: int) -> "StaticDestination | None":
        """Where a restore of `n` tokens followed by `s` new ones may write its K/V: the rows 0..n-1 of the
        static cache its forward will run on (None: no such bucket yet, or nothing to gain).

        Saves the forward a copy of the whole prefix (GPU time and a launch per layer). The bucket's
        earlier borrowers copy out what they point at first; the restoring cache must then be `lend`-ed.
        Also given to the call that captures the bucket, so that the restore's own graphs for it are
        captured in that call too, not in a later one.
        """
        if not self.enabled:
            return None
        key = (suffix_bucket(s), bucket_rows(n + suffix_bucket(s)))
        b = self._buckets.get(key)
        if b is None or (self.capture and b.graphs is None and b.asked + 1 < CAPTURE_ON_USE):
            return None
        self._release(b)
        return StaticDestination(b, n)

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
        if self.capture and b.asked < CAPTURE_ON_USE:
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
        self._release(b, keep=cache)  # this cache's restore may have written into the bucket (`destination`)
        b.ids[:, :s].copy_(ids)
        torch.add(b.base, n, out=b.pos[0])
        b.idx.fill_(s - 1)
        for static in b.cache.layers:
            static.length = n + s
        parts = (segments(len(cache.layers), self.segment_layers) if len(self.decoder_layers) == len(cache.layers)
                 else [range(len(cache.layers))])
        if not self.capture or b.graphs is None:  # eager (CPU), or capturing: everything copied in first
            for l in range(len(cache.layers)):
                self._copy_in(b, cache, l, n)
            with _attention(self.model, self.attention):  # switched outside a capture, not in it
                if self.capture:
                    self._capture(b, forward, parts)
                else:
                    self._static_forward(b, forward)
            for g in b.graphs or ():
                g.replay()
        else:
            current = torch.cuda.current_stream(self.device)
            stream = self._replay_stream()
            for part, g in zip(parts, b.graphs):  # a segment runs once its own layers are copied in
                for l in part:
                    self._copy_in(b, cache, l, n)  # the current stream waits for those layers' restore
                if stream is None:
                    g.replay()
                    continue
                stream.wait_stream(current)
                with torch.cuda.stream(stream):
                    g.replay()
            if stream is not None:
                current.wait_stream(stream)
        self.replays += bool(self.capture)
        self.runs += 1
        source = _GraphSlice(b, n + s)
        for layer in cache.layers:
            layer.defer(source, n + s)
        b.borrowers.add(cache)
        return b.logits.clone()

    def _replay_stream(self) -> "torch.cuda.Stream | None":
        """The stream segments are replayed on: of the highest priority (None: the current stream).

        While a restore is in flight its projections fill the SMs, and the forward, on the critical path,
        should get them first: at a higher priority its pending blocks are scheduled before the
        projections' (the projections wait on the copies anyway). Measured neutral on the lent H200
        (7B/4K: 33.3 ms, 32.7 on the current stream): a running GEMM's blocks are not preempted, so the
        forward's short kernels still wait for them to retire."""
        if not self.high_priority:
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device, priority=-100)  # clamped to the highest
        return self._stream

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

    def _copy_in(self, b: _Bucket, cache: LazyCache, layer: int, n: int) -> None:
        """Layer `layer`'s restored prefix into the static cache (the stream waits for its restore, not the host);
        nothing to copy when the restore wrote it there (`destination`)."""
        restored, static = cache.layers[layer], b.cache.layers[layer]
        k, v = restored.keys, restored.values
        if k.data_ptr() == static.keys.data_ptr() and v.data_ptr() == static.values.data_ptr():
            self.in_place += 1
            return
        static.keys[:, :, :n].copy_(k)
        static.values[:, :, :n].copy_(v)

    def _capture(self, b: _Bucket, forward, parts: list[range]) -> None:
        """Capture the segments, with the layers' small blocks compiled (`compile_blocks`) if that works."""
        if self.compile_blocks:
            try:
                with compiled_blocks(self.decoder_layers):
                    return self._capture_segments(b, forward, parts)
            except Exception as e:  # a compiler problem costs the fusion, not the captured prefill
                log.warning("captured prefill: compiling the layers' blocks failed (%s); capturing them eagerly", e)
                self.compile_blocks = False
        self._capture_segments(b, forward, parts)

    def _capture_segments(self, b: _Bucket, forward, parts: list[range]) -> None:
        dev = self.device
        current = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm up off the graph (library handles, lazy buffers)
            self._static_forward(b, forward)
        current.wait_stream(side)
        # Not `torch.cuda.graph(...)`: its entry synchronizes, collects garbage and empties the
        # allocator's cache. thread_local: the store's and loader's threads may use CUDA meanwhile.
        # One graph per segment: a pre-hook on each segment's first layer ends the capture so far and begins
        # the next, in one memory pool (safe: they are always replayed in the order they were captured).
        # A capture stream of the bucket's own: its segments share one cuBLAS workspace, which no projection
        # graph (replayed beside them) or eager work uses (see `capture_streams`).
        lane = CaptureStream(dev)
        capture = lane.stream
        capture.wait_stream(current)
        graphs = [lane.graph() for _ in parts]
        b.pool = torch.cuda.graph_pool_handle()
        at = [0]

        def next_segment(module, args, kwargs):
            graphs[at[0]].capture_end()
            at[0] += 1
            graphs[at[0]].capture_begin(pool=b.pool, capture_error_mode="thread_local")

        hooks = [self.decoder_layers[part.start].register_forward_pre_hook(next_segment, with_kwargs=True)
                 for part in parts[1:]]
        with torch.cuda.stream(capture):
            graphs[0].capture_begin(pool=b.pool, capture_error_mode="thread_local")
            try:
                self._static_forward(b, forward)
            finally:
                graphs[at[0]].capture_end()
                for h in hooks:
                    h.remove()
        current.wait_stream(capture)
        if at[0] != len(parts) - 1:
            raise RuntimeError(f"captured {at[0] + 1} segments of {len(parts)}: the decoder layers did not all run")
        b.graphs = graphs
        self.captures += 1

    @staticmethod
    def _release(b: _Bucket, keep=None) -> None:
        """Before the bucket's memory is written again, earlier caches (all but `keep`) copy out what they
        still point at: layers left in graph memory, and K/V a restore wrote into the static cache."""
        static = {t.untyped_storage().data_ptr() for layer in b.cache.layers for t in (layer.keys, layer.values)}
        for cache in [c for c in b.borrowers if c is not keep]:
            for layer in cache.layers:
                if isinstance(layer, LazyLayer):
                    if not layer.ready:
                        layer.materialize()
                    for name in ("keys", "values"):
                        t = getattr(layer, name)
                        if t is not None and t.untyped_storage().data_ptr() in static:
                            setattr(layer, name, t.clone())
            b.borrowers.discard(cache)


@contextmanager
def _attention(model: torch.nn.Module, name: str | None):
    """The model's attention implementation set to `name` for one forward (None: left as it is)."""
    saved = getattr(model.config, "_attn_implementation", None)
    if name is None or name == saved or saved is None:
        yield
        return
    if name == split_attention.NAME:
        split_attention.register()
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def _copy_input(buf: torch.Tensor):
    def hook(module, args, kwargs):
        buf.copy_(args[0] if args else kwargs["hidden_states"])

    return hook


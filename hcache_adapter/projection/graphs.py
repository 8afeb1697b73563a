"""CUDA graphs of a projector's per-layer K/V projection, for prefixes that start at position 0.

Why: issuing one layer's projection from Python costs ~0.3 ms of CPU on the
lent H100's host (dynamo's guards, wrappers, a handful of launches at ~20 us
each), as much as the GPU needs to run it; a restore is then bound by the CPU,
not by the copy engine or the tensor cores. Replaying a captured graph costs
~30 us.

Graphs need fixed shapes and addresses, so:

* lengths are rounded up to a bucket (`bucket_rows`, at most ~25% padding); the
  padding rows are projected too and dropped;
* the hidden state is copied into the bucket's static input, and K/V are copied
  out of its static outputs (stream-ordered), so restored K/V never alias graph
  memory that the next layer or the next restore overwrites;
* except where the caller names a destination that may take the bucket's
  padded rows (`out_rows`: a captured prefill's static cache): a graph captured
  for that destination (on its first use) writes K/V there itself, and nothing is copied out. On
  the lent H200 (7B shape, 4K) the copies out were 1.15 of the restore's 18.1
  ms of GPU time;
* a bucket is captured only when it is asked for the second time (a length
  seen once, as in a growing chat, is not worth a capture), and only a few
  buckets are kept (least recently used first out).

Every layer of a bucket shares one memory pool (one layer's intermediates at a
time, not all of them) and one capture stream of its own (`CaptureStream`: so
one cuBLAS workspace, which no other group's graphs or eager work touch). A
bucket's graphs go together: once it holds `max_direct` destination graphs,
further destinations take the copying graph (dropping some graphs alone would
free the workspace the others still use).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hcache_adapter.capture_streams import CaptureStream

from .base import copy_into

log = logging.getLogger(__name__)

KV = tuple[Tensor, Tensor]
# (layer, hidden [1, T, D], cos, sin) -> (K [1, H, T, hd], V [1, H, T, hd])
ProjectFn = Callable[[int, Tensor, Tensor, Tensor], KV]
# (layer, hidden [1, T, D], cos, sin, K out, V out [1, H, T, hd], any strides) -> None: the same, written in place
ProjectIntoFn = Callable[[int, Tensor, Tensor, Tensor, Tensor, Tensor], None]
RotaryFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (hidden, position_ids) -> (cos, sin)

MIN_STEP = 256
# Graphs per layer and destination that read the hidden state in place: a loader's slots hold a layer at the
# same address on every restore of a length (`LayerLoader`: slot = read index mod the ring's depth), so one
# suffices in the steady state; a caller whose tensors move from call to call (a fresh buffer each time)
# then copies in instead.
MAX_SOURCES = 4


def bucket_rows(n: int) -> int:
    """Rows a graph is captured for: n rounded up to a step of a quarter of its power of two (>= 256)."""
    if n <= MIN_STEP:
        return MIN_STEP
    step = max(MIN_STEP, 1 << (n.bit_length() - 3))
    return -(-n // step) * step


def widen(out: KV, rows: int, capacity: int) -> KV | None:
    """`out`'s tensors ([1, H, n, hd] views) extended along the sequence to `rows` rows, over the same storage
    and strides: where a graph of `rows` rows may write in place. None when `rows` exceeds `capacity` (the
    rows the caller lets be written) or a tensor's storage does not hold them."""
    if rows > capacity:
        return None
    wide = []
    for t in out:
        if t.dim() != 4 or rows < t.shape[2]:
            return None
        size = (t.shape[0], t.shape[1], rows, t.shape[3])
        last = t.storage_offset() + sum((n - 1) * st for n, st in zip(size, t.stride()))
        if min(t.stride()) < 0 or last >= t.untyped_storage().nbytes() // t.element_size():
            return None
        wide.append(t if rows == t.shape[2] else t.as_strided(size, t.stride(), t.storage_offset()))
    return wide[0], wide[1]


@dataclass
class _Bucket:
    rows: int
    hidden: Tensor
    cos: Tensor
    sin: Tensor
    pool: object
    lane: CaptureStream
    k_out: Tensor | None = None
    v_out: Tensor | None = None
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)
    direct: dict[tuple, torch.cuda.CUDAGraph] = field(default_factory=dict)  # (source, layer, destination) -> graph
    sources: dict[tuple, int] = field(default_factory=dict)  # (layer, destination) -> graphs for sources in place


class PrefixGraphs:
    """Per-layer projection replayed from CUDA graphs, bucketed by length (see the module doc)."""

    def __init__(self, fn: ProjectFn, rotary: RotaryFn, *, max_buckets: int = 2, sm_carveout: int | None = None,
                 fn_into: ProjectIntoFn | None = None, kv_shape: Callable[[int, int], tuple] | None = None,
                 max_direct: int = 256, read_in_place: bool = True):
        """`sm_carveout`: SMs the captured GEMMs leave free (cuBLAS's SM count target, where torch has it),
        so that a forward running beside a restore finds SMs without waiting for a GEMM's wave to end.
        `fn_into` (with `kv_shape(layer, rows)`, K's and V's shape): `fn` writing into given tensors; graphs
        then capture it, into the bucket's outputs or into a destination (`project`'s `out_rows`).
        `max_direct`: graphs a bucket captures for destinations (others then copy out of its own graph).
        `read_in_place`: a destination graph of a length with no padding rows reads the caller's hidden state
        where it lies (the loader's slot; a layer lands in the same slot on every restore of a length) instead
        of a copy in the bucket's input: one device copy a layer less (32 MiB at the 7B's 4K, ~0.55 ms of GPU
        time in 32 layers). Only without padding: the rows past the caller's tensor are not the graph's to read."""
        if fn_into is not None and kv_shape is None:
            raise ValueError("fn_into needs kv_shape")
        self.fn = fn
        self.fn_into = fn_into
        self.kv_shape = kv_shape
        self.max_direct = max_direct
        self.sm_carveout = sm_carveout
        self.rotary = rotary
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[tuple, _Bucket] = OrderedDict()
        self._asked: dict[tuple, int] = {}
        self.captures = 0
        self.replays = 0
        self.direct_replays = 0  # replays that wrote into the caller's destination
        self.in_place_inputs = 0  # of those, replays that read the caller's hidden state where it lies
        self.read_in_place = read_in_place

    def project(self, layer: int, hidden: Tensor, out: KV | None = None, out_rows: int | None = None) -> KV | None:
        """K/V of `layer` for `hidden` ([1, n, D] on CUDA, positions 0..n-1); None: not graphed (yet).
        `out`: where to copy them (instead of fresh tensors); `out_rows`: rows along the sequence its storage
        may be written (the bucket's padding included), so that a graph captured for it writes there itself
        (captured on the destination's first use: see `_replay_into`)."""
        n = hidden.shape[1]
        key = (bucket_rows(n), hidden.shape[2], hidden.dtype, hidden.device)
        b = self._buckets.get(key)
        if b is None:
            # Counted per layer: a plan whose first layers are K/V (or recomputed) projects no layer 0.
            self._asked[key, layer] = self._asked.get((key, layer), 0) + 1
            if self._asked[key, layer] < 2:
                if len(self._asked) > 4096:  # many lengths seen once each (growing chats): start counting afresh
                    self._asked.clear()
                return None
            b = self._new_bucket(key)
            self._asked = {k: v for k, v in self._asked.items() if k[0] != key}
        self._buckets.move_to_end(key)
        wide = (widen(out, b.rows, out_rows) if out is not None and out_rows is not None and self.fn_into is not None
                else None)
        if wide is not None and self.read_in_place and n == b.rows and hidden.is_contiguous():
            if self._replay_into(b, layer, wide, hidden, max_sources=MAX_SOURCES):  # read where it lies: no copy in
                self.in_place_inputs += 1
                return out
        b.hidden[:, :n].copy_(hidden)
        if wide is not None and self._replay_into(b, layer, wide, b.hidden):
            return out
        g = b.graphs.get(layer)
        if g is None:
            g = self._capture(b, layer)
        g.replay()
        self.replays += 1
        if out is not None:
            return copy_into((b.k_out[:, :, :n], b.v_out[:, :, :n]), out)
        return b.k_out[:, :, :n].clone(), b.v_out[:, :, :n].clone()

    def clear(self) -> None:
        self._buckets.clear()
        self._asked.clear()

    def _new_bucket(self, key: tuple) -> _Bucket:
        rows, width, dtype, device = key
        while len(self._buckets) >= self.max_buckets:
            self._buckets.popitem(last=False)
        hidden = torch.zeros(1, rows, width, dtype=dtype, device=device)
        cos, sin = self.rotary(hidden, torch.arange(rows, device=device).unsqueeze(0))
        b = _Bucket(rows, hidden, cos, sin, torch.cuda.graph_pool_handle(), CaptureStream(device))
        self._buckets[key] = b
        return b

    def _replay_into(self, b: _Bucket, layer: int, wide: KV, source: Tensor, max_sources: int | None = None) -> bool:
        """Replay `layer`'s graph for the destination `wide` reading `source`, captured on its first use; False:
        the bucket holds `max_direct` such graphs already, or `max_sources` for this layer and destination.

        A destination is a captured prefill's static cache, which exists only for a length asked for
        before, and stays put while its bucket lives: waiting for a second use would only move the captures
        (tens of ms, a recompile for the new strides) from the call that captures the prefill into a later
        one. Measured on the H200 before: the fourth generate() of a length took 0.2-1.4 s."""
        target = (layer, *((t.data_ptr(), t.stride()) for t in wide))
        key = (source.data_ptr(), *target)
        g = b.direct.get(key)
        if g is None:
            if len(b.direct) >= self.max_direct:
                return False
            if max_sources is not None and b.sources.get(target, 0) >= max_sources:
                return False  # this layer's hidden state arrives somewhere new each time: copy it in instead
            b.sources[target] = b.sources.get(target, 0) + 1
            with _carveout(self.sm_carveout):
                g = b.direct[key] = self._capture_graph(b, lambda: self.fn_into(layer, source, b.cos, b.sin, *wide),
                                                        warm=True)
            self.captures += 1
        g.replay()
        self.replays += 1
        self.direct_replays += 1
        return True

    def _capture(self, b: _Bucket, layer: int) -> torch.cuda.CUDAGraph:
        with _carveout(self.sm_carveout):
            return self._capture_layer(b, layer)

    def _capture_layer(self, b: _Bucket, layer: int) -> torch.cuda.CUDAGraph:
        if self.fn_into is not None:
            if b.k_out is None:
                shape = self.kv_shape(layer, b.rows)
                b.k_out = b.hidden.new_empty(shape)
                b.v_out = b.hidden.new_empty(shape)
            body = lambda: self.fn_into(layer, b.hidden, b.cos, b.sin, b.k_out, b.v_out)  # noqa: E731
        else:
            def body():
                k, v = self.fn(layer, b.hidden, b.cos, b.sin)
                if b.k_out is None:  # the warm-up run: shapes known now
                    b.k_out, b.v_out = torch.empty_like(k), torch.empty_like(v)
                b.k_out.copy_(k)
                b.v_out.copy_(v)
        g = b.graphs[layer] = self._capture_graph(b, body, warm=not b.graphs)
        self.captures += 1
        return g

    @staticmethod
    def _capture_graph(b: _Bucket, body: Callable[[], None], *, warm: bool) -> torch.cuda.CUDAGraph:
        """A graph of `body()` in the bucket's pool; `warm`: run it once off the graph first (compilation,
        library handles: the bucket's first capture, or a destination of other strides)."""
        dev = b.hidden.device
        current = torch.cuda.current_stream(dev)
        if warm:
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                body()
            current.wait_stream(side)
        # Not `torch.cuda.graph(...)`: its entry synchronizes the device, collects garbage and
        # empties the allocator's cache, ~50 ms a layer in a busy process. thread_local: the
        # store's and the loader's threads may use CUDA meanwhile.
        capture = b.lane.stream
        capture.wait_stream(current)
        g = b.lane.graph()
        with torch.cuda.stream(capture):
            g.capture_begin(pool=b.pool, capture_error_mode="thread_local")
            try:
                body()
            finally:
                g.capture_end()
        current.wait_stream(capture)
        return g


@contextmanager
def _carveout(sms: int | None):
    """cuBLAS leaves `sms` SMs free for the kernels launched meanwhile (None, or a torch without it: as is)."""
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if not sms or setter is None:
        yield
        return
    before = torch._C._get_sm_carveout_experimental()
    setter(sms)
    try:
        yield
    finally:
        setter(before)

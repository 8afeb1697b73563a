"""PrefixSource: the layers of one restore, produced as the cache (or the caller) takes them.

A `Restorer` makes one per restore. It recomputes the leading layers, reads the
others through a `LayerLoader`, and projects (hidden states) or reshapes (K/V)
each; layer 0's hidden state, where it is the token embedding, is made on the
device from the tokens instead of read (`Restorer.embeds_first`). On a GPU
with every chunk in memory tiers it queues that work on the restorer's compute
stream a fixed distance ahead of the layer the model takes,
each layer with an event the model's stream waits on; otherwise a layer is
produced when it is first taken. A layer whose chunks cannot all be read is
recomputed from tokens when the cache's length is already fixed.
"""
from __future__ import annotations

import bisect
import logging
import math
import time
from typing import Callable

import torch

from hcache_adapter.compat import fill_layer, layer_kv
from hcache_adapter.loader import LayerLoader, LayerRead
from hcache_adapter.manifest import HIDDEN

log = logging.getLogger(__name__)


class PrefixSource:
    """Produces the layers of one restore (implements `LayerSource` for the lazy cache)."""

    def __init__(self, restorer, ids: torch.Tensor, digests: list[str], plan: str, recompute_layers: int,
                 where, marks=None, exchange=None, plain_layers=frozenset(),
                 into: Callable[[int], tuple] | None = None, early=None):
        """`restorer`: the `Restorer` whose layout, store, streams, projector and recomputer this uses.
        `early`: an `EarlyLoad` the restorer took over (its reads and loader are this restore's).
        `marks`: told `recomputed()` once the leading layers' recomputation is queued and `restored(read_time)`
        once every layer's is (with what its NVMe reads delivered, or None), or None."""
        self.r = restorer
        self.early = early
        self.into = into
        self.plain = plain_layers
        self.exchange = exchange  # tensor parallelism: this rank reads its share; the exchange gathers
        self.marks = marks
        self.ids = ids
        self.m = len(digests)
        self.n_tokens = self.m * restorer.layout.chunk_tokens
        self.plan = plan
        self.recompute_layers = recompute_layers
        self.reads = early.loader.reads if early is not None else restorer.layer_reads(
            digests, plan, recompute_layers, where.keys if where is not None else None, exchange)
        self._index = {read.layer: i for i, read in enumerate(self.reads)}
        self._layers = [read.layer for read in self.reads]
        self.embedded = restorer.embeds_first(plan, recompute_layers)  # layer 0 from the token embedding
        self.where = where  # prefix.LayerLocations from the planner: keys and tiers per layer
        self.loader: LayerLoader | None = None
        self._ready: dict[int, tuple] = {}  # layer -> (k, v, valid chunks, event or None)
        self._positions: torch.Tensor | None = None
        self._taken = 0
        self._warned = False
        self._recomputed = None  # the cache the leading layers were recomputed into
        self._queued: int | None = None  # reads queued on the compute stream so far (None: not queued ahead)
        self._ahead = 0  # reads kept queued ahead of the one the model takes
        self._queued_at: float | None = None  # when the first layers were queued (until the model takes one)

    # -- producing ----------------------------------------------------------------
    def start(self) -> None:
        r = self.r
        if self.recompute_layers:
            if self.reads:
                self._open_loader(start=False)  # started once layer 0's recomputation is issued
            cache = self._recomputed = r.recomputer.prefix(
                self.ids, self.recompute_layers, after_first=self._start_reads if self.reads else None)
            if self.marks is not None:
                self.marks.recomputed()
            if self.reads:
                self._start_reads()  # (once: a model whose forward never reached layer 1's hook)
            for l in range(self.recompute_layers):
                if l in self.plain:
                    k, v = layer_kv(cache, l)
                    self._ready[l] = (k, v, self.m, None)
        elif self.reads:
            self._open_loader()
        if (r.cuda and self.loader is not None and self.loader.inline
                and all(read.layer in self.plain for read in self.reads)):
            # Nothing blocks (memory tiers, GPU): queue the layers' copies and compute on a side stream, after
            # what the caller's stream already queued (`into`'s memory may still be read there). Only the
            # first `issue_ahead.budget(...)` bytes now; the rest as the model takes layers (`produce`), so that the
            # host's issuing interleaves with generate()'s first forward instead of preceding it.
            r.compute_stream.wait_stream(torch.cuda.current_stream(r.device))
            self._queued = 0
            # Under tensor parallelism every layer's all-gather is issued now, as before: the ranks' collectives
            # then never interleave with the model's own.
            budget = r.issue_ahead.budget(read_bytes(self.reads[0], r.layout.itemsize))
            self._ahead = (len(self.reads) if self.exchange is not None
                           else layers_ahead(self.reads, budget, r.layout.itemsize))
            if self.embedded:  # needs no copy: its projection runs while layer 1's hidden state is copied
                with torch.cuda.stream(r.compute_stream):
                    k, v = self._embedded()
                    ev = torch.cuda.Event()
                    ev.record(r.compute_stream)
                self._ready[0] = (k, v, self.m, ev)
            self._queue_until(self._ahead)
            self._queued_at = time.perf_counter()  # the model's first take measures generate()'s set-up

    def _queue_until(self, end: int) -> None:
        """Queue the copy and compute of `reads[:end]` on the compute stream (inline loaders only)."""
        r = self.r
        end = min(end, len(self.reads))
        if self._queued >= end:
            return
        t0, first = time.perf_counter(), self._queued
        with torch.cuda.stream(r.compute_stream):
            while self._queued < end:
                read = self.reads[self._queued]
                try:
                    k, v, valid = self._compute(read)
                except Exception as e:  # queued from inside the model's forward: the layer is recomputed instead
                    log.warning("restore: layer %d could not be loaded (%s); recomputing it from tokens", read.layer, e)
                    k, v, valid = None, None, 0
                ev = torch.cuda.Event()
                ev.record(r.compute_stream)
                self._ready[read.layer] = (k, v, valid, ev)
                self._queued += 1
        r.issue_ahead.observe_issue(time.perf_counter() - t0, self._queued - first)
        if self._queued == len(self.reads):
            self._close_loader()

    def _start_reads(self) -> None:
        """Start the loader: the loaded layers' I/O then overlaps the rest of the recomputation."""
        self.loader.start()
        self.loader.prefetch()

    def _open_loader(self, start: bool = True) -> None:
        if self.early is not None:  # started before the lookup finished (`Restorer.begin`)
            self.loader, self.early = self.early.loader, None
            return
        where = None
        if self.where is not None:
            first = self._layers[0] if self._layers else len(self.plan)
            where = [w for l, kind in enumerate(self.plan) if l >= first for w in self.where.tiers.get(l, [])]
        self.loader = self.r.open_loader(
            self.reads, self.m, self.plan,
            where=where if where and len(where) == sum(len(x.keys) for x in self.reads) else None, start=start)

    def _close_loader(self) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    def _loaded(self, read: LayerRead) -> tuple[torch.Tensor, int]:
        """One layer's chunks (blocking until read) and how many lead chunks were readable."""
        i = self._index[read.layer]
        if self.exchange is None:
            loaded = self.loader.get(i)
            return loaded.data, loaded.valid_chunks
        # this rank's share, gathered into the whole layer; `valid` is the same on every rank
        return self.exchange.layer(read.layer, read.kind, lambda: self.loader.get(i))

    def _hidden(self, data: torch.Tensor, valid: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = valid * self.r.layout.chunk_tokens
        return data[:valid].reshape(1, rows, -1), self._positions_of(rows)

    def _positions_of(self, rows: int) -> torch.Tensor:
        if self._positions is None or self._positions.shape[1] != rows:
            self._positions = torch.arange(rows, device=self.r.device).unsqueeze(0)
        return self._positions

    def fill(self, cache, layer: int, *, must: bool = False) -> int:
        """Restore a layer of a kind that is not plain K/V (sliding, recurrent, ...) into `cache` itself,
        through the projector's `fill_prefix` (the model's own cache layer); returns the valid chunks.
        `must`: the cache's length is already fixed, so an unreadable layer is recomputed from tokens."""
        try:
            if layer < self.recompute_layers:
                if self._recomputed is not None and layer < len(self._recomputed.layers):
                    cache.layers[layer] = self._recomputed.layers[layer]
                return self.m
            read = self.reads[self._index[layer]]
            i = self._index[layer]
            try:
                data, valid = self._loaded(read)
                if valid == self.m or (valid and not must):
                    if read.kind == HIDDEN:
                        with self.r.recomputer.internal.running():  # the generic projector calls model layers
                            self.r.projector.fill_prefix(cache, layer, *self._hidden(data, valid))
                    else:
                        fill_layer(cache, layer, *_kv_from_chunks(data, valid, self.r.layout.chunk_tokens))
            finally:
                self.loader.release(i)
            if valid < self.m and must:
                self._warn(layer, valid)
                fresh = self.r.recomputer.prefix(self.ids, layer + 1)
                cache.layers[layer] = fresh.layers[layer]
                return self.m
            return valid
        finally:
            self._count_taken()

    def _compute(self, read: LayerRead) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Load one layer (blocking until read) and project or reshape it on the current stream."""
        i = self._index[read.layer]
        try:
            data, valid = self._loaded(read)
            if valid == 0:
                return None, None, 0
            out = self.into(read.layer) if self.into is not None and valid == self.m else None
            if read.kind == HIDDEN:
                with self.r.recomputer.internal.running():  # the generic projector calls model layers
                    rows = getattr(self.into, "capacity", None) if out is not None else None
                    k, v = self.r.projector.project_prefix(read.layer, *self._hidden(data, valid), out=out,
                                                           out_rows=rows)
            else:
                k, v = _kv_from_chunks(data, valid, self.r.layout.chunk_tokens, out)
            return k, v, valid
        finally:
            self.loader.release(i)

    def _embedded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 0's K/V projected from the tokens' embedding (its input hidden state), on the current stream."""
        r = self.r
        hidden = r.recomputer.first_input(self.ids).to(r.layout.dtype)
        out = self.into(0) if self.into is not None else None
        rows = getattr(self.into, "capacity", None) if out is not None else None
        with r.recomputer.internal.running():
            return r.projector.project_prefix(0, hidden, self._positions_of(self.n_tokens), out=out, out_rows=rows)

    def produce(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(K, V, valid chunks) of `layer`, its work done or queued on the current stream."""
        if self._queued_at is not None:
            self.r.issue_ahead.observe(time.perf_counter() - self._queued_at)
            self._queued_at = None
        if self._queued is not None and (layer in self._index or (layer == 0 and self.embedded)):
            self._queue_until(bisect.bisect_right(self._layers, layer) + self._ahead)
        ready = self._ready.pop(layer, None)
        if ready is None and layer == 0 and self.embedded:
            k, v = self._embedded()
            valid = self.m
        elif ready is None:
            if self.loader is None:
                raise RuntimeError(f"layer {layer} was already taken or never planned")
            k, v, valid = self._compute(self.reads[self._index[layer]])
        else:
            k, v, valid, ev = ready
            if ev is not None:
                stream = torch.cuda.current_stream(self.r.device)
                stream.wait_event(ev)
                if k is not None:  # made on the compute stream, used and freed on this one
                    k.record_stream(stream)
                    v.record_stream(stream)
        self._count_taken()
        return k, v, valid

    def _count_taken(self) -> None:
        self._taken += 1
        if self._taken == self.r.layout.num_layers:
            read_time = self.loader.read_time() if self.loader is not None else None
            self.close()
            if self.marks is not None:
                self.marks.restored(read_time)

    def _warn(self, layer: int, valid: int) -> None:
        if not self._warned:
            log.warning("restore: layer %d has %d of %d chunks readable; recomputing it from tokens",
                        layer, valid, self.m)
            self._warned = True

    def take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`LayerSource.take`: a layer whose chunks could not all be read is recomputed from tokens."""
        k, v, valid = self.produce(layer)
        if valid < self.m:
            self._warn(layer, valid)
            k, v = self.r.recomputer.layer(self.ids, layer)
        return k, v

    def close(self) -> None:
        self._close_loader()


def read_bytes(read: LayerRead, itemsize: int) -> int:
    """Bytes one layer's read copies."""
    return len(read.keys) * math.prod(read.chunk_shape) * itemsize


def layers_ahead(reads: list, budget: int, itemsize: int) -> int:
    """How many of `reads` (from the first) fit in `budget` bytes of copies; at least one."""
    total, n = 0, 0
    for read in reads:
        total += read_bytes(read, itemsize)
        if n and total > budget:
            break
        n += 1
    return max(1, n)


def _kv_from_chunks(data: torch.Tensor, valid: int, C: int, out: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[chunks, 2, kv_heads, C, head_dim] -> K, V [1, kv_heads, valid * C, head_dim], one copy each
    (into `out` when given)."""
    kv = data[:valid]
    heads, hd = kv.shape[2], kv.shape[-1]
    k, v = out if out is not None else (kv.new_empty(1, heads, valid * C, hd), kv.new_empty(1, heads, valid * C, hd))
    k.view(heads, valid, C, hd).copy_(kv[:, 0].transpose(0, 1))
    v.view(heads, valid, C, hd).copy_(kv[:, 1].transpose(0, 1))
    return k, v

"""Restorer: turn a stored prefix into a cache the model can run on.

A restore of m chunks (n = m * C tokens) with plan p (per layer: H hidden
state, K K/V, R recomputed) and r leading layers recomputed runs:

* layers 0..r-1 recomputed from the prefix tokens (`Recomputer`), first;
* layers r.. read by a `LayerLoader` (ring of device buffers, reads queued
  ahead) and then projected (H) or reshaped (K).

With `lazy=True` the result is a `LazyCache`: on a GPU with every chunk in a
memory tier, that work is queued on a side stream, the first 1.5 GiB of it
at once and the rest a fixed distance ahead of the layer the model takes, and
the model's attention at layer i waits on layer i's event; otherwise (NVMe
reads, the CPU) layer i is produced when the model first needs it. A layer whose
chunks turn out unreadable then is recomputed from tokens, so the cache never
holds wrong state and its length never changes under the model. With
`lazy=False` every layer is produced before returning and the cache is cut to
the chunks every layer could read (`restore()`'s contract).

A long restore's first reads can start before its lookup has located every
layer (`Restorer.begin`, an `EarlyLoad`): `restore` takes them over when the
lookup then agrees (the same chunks, plan and recomputed layers, nothing on
NVMe), and cancels them otherwise, so they change when the copies start, never
what is restored. On a GPU only: there a read is a queued copy.

Under tensor parallelism an `exchange` (hcache_adapter.parallel.gather) sits
between a layer's read and its projection: each rank reads its share of a
hidden-state layer's chunks and the exchange all-gathers the rest.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from transformers.cache_utils import DynamicLayer

from hcache_adapter.compat import fill_layer, new_cache
from hcache_adapter.issue_ahead import IssueAhead
from hcache_adapter.lazycache import LazyCache
from hcache_adapter.layout import StateLayout
from hcache_adapter.loader import MEMORY_TIERS, LayerLoader, LayerRead, SlotRing
from hcache_adapter.manifest import HIDDEN, RECOMPUTE
from hcache_adapter.prefix_source import PrefixSource
from hcache_adapter.recompute import Recomputer

log = logging.getLogger(__name__)

# Restores of fewer keys are not started early: locating them all costs less (~0.3 ms) than the copies a
# lookup that then disagrees (auto recomputing a short prefix) would have queued for nothing.
EARLY_MIN_KEYS = 1024


@dataclass
class EarlyLoad:
    """The first reads of a restore, started before its lookup finished (`Restorer.begin`)."""

    loader: LayerLoader  # its `reads`: the layers queued so far, then (taken over) the whole restore's
    chunks: int
    plan: str
    recompute_layers: int
    taken: bool = False  # a restore took the loader over: it is that restore's to close

    def cancel(self) -> None:
        """Stop it unless a restore took it over (idempotent); copies already queued land in ring slots
        that the next loader overwrites."""
        if not self.taken:
            self.loader.close()


@dataclass
class RestoreResult:
    """What a restore produced. Unpacks as ``cache, tokens`` (the older tuple form)."""

    cache: Any
    tokens: int = 0
    plan: str = ""
    recompute_layers: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # bytes per tier the plan reads
    digests: list[str] = field(default_factory=list)  # of the restored chunks, in order
    stored_chunks: int = 0  # whole chunks of the request already stored (restored or left to the prefill)
    seconds: float = 0.0  # host time of the restore call (the GPU work may still run)
    release: Callable[[], None] | None = field(default=None, repr=False)  # ends a lazy restore's readers
    answered: Callable[[], None] | None = field(default=None, repr=False)  # to call once generate()'s first forward ran

    def close(self) -> None:
        """Stop what a lazy restore still runs (reader threads); layers not yet taken can no longer be."""
        if self.release is not None:
            self.release()

    def __iter__(self):
        return iter((self.cache, self.tokens))

    def __getitem__(self, i):
        return (self.cache, self.tokens)[i]

    @property
    def prefix_digest(self) -> str | None:
        """Digest of the last restored chunk: where the saver continues the chain."""
        return self.digests[-1] if self.digests else None


class Restorer:
    """Builds restored caches for one model; holds the streams and sizes shared by every restore."""

    def __init__(self, layout: StateLayout, store, projector, recomputer: Recomputer, device: torch.device, *,
                 prefetch_bytes: int | None = None, exchange=None, issue_ahead_bytes: int | None = None):
        """`exchange`: a tensor-parallel `HiddenExchange` (None: one process reads everything).
        `issue_ahead_bytes`: how much of a memory-tier restore is queued before the model takes its first
        layer, and kept queued ahead of the layer it takes; None: as much as lasts through generate()'s
        set-up as measured (`IssueAhead`)."""
        self.layout = layout
        self.exchange = exchange
        self.issue_ahead = IssueAhead(fixed=issue_ahead_bytes)
        self.store = store
        self.projector = projector
        self.recomputer = recomputer
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetch_bytes = prefetch_bytes if prefetch_bytes is not None else (
            (2 << 30) if self.cuda else (256 << 20))
        self.compute_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.ring = SlotRing(self.device)
        self.inline_lookahead: int | None = LayerLoader.LOOKAHEAD  # LayerLoader's `lookahead` (layers queued ahead)
        self.lease_reads = True  # LayerLoader's `lease`
        # `begin` starts restores of at least this many keys early; None: never, the default on a CPU, where a
        # read is a synchronous copy that gains nothing from starting early and reader threads read ahead instead
        self.early_min_keys: int | None = EARLY_MIN_KEYS if self.cuda else None
        # Which layers are plain K/V, one cache layer per decoder layer (fetched lazily, cut back on misses);
        # the others are restored through the projector's fill_prefix into the model's own cache layers.
        template = new_cache(recomputer.model)
        one_to_one = len(template.layers) == layout.num_layers
        self.plain_layers = frozenset(l for l in range(layout.num_layers)
                                      if one_to_one and type(template.layers[l]) is DynamicLayer)

    @property
    def issue_ahead_bytes(self) -> int:
        """The bytes the next memory-tier restore queues ahead (see `IssueAhead`)."""
        return self.issue_ahead.budget()

    @issue_ahead_bytes.setter
    def issue_ahead_bytes(self, value: int | None) -> None:
        """A fixed budget (None: measured again)."""
        self.issue_ahead = IssueAhead(fixed=value)

    def embeds_first(self, plan: str, recompute_layers: int) -> bool:
        """Whether a restore with `plan` makes layer 0 from the token embedding instead of loading its hidden
        state: it is loaded and saved as one (not recomputed), a plain K/V cache layer, layer 0's input is the
        embedding (`Recomputer.embeds_first_layer`), and one process reads everything (no tensor-parallel
        exchange). One layer's bytes fewer to move (1/32 of a 7B restore), exactly the same K/V."""
        return (recompute_layers == 0 and plan[:1] == HIDDEN and 0 in self.plain_layers and self.exchange is None
                and self.projector is not None and self.recomputer.embeds_first_layer)

    def first_read(self, plan: str, recompute_layers: int) -> int:
        """The first layer a restore reads: after the recomputed ones and layer 0 if it is embedded."""
        return 1 if self.embeds_first(plan, recompute_layers) else recompute_layers

    def slot_bytes(self, n_chunks: int, plan: str) -> int:
        """Bytes of the largest loaded layer of a restore of `n_chunks` chunks with `plan`."""
        L = self.layout
        return max((L.bytes_per_token(l, k) for l, k in enumerate(plan) if k != RECOMPUTE),
                   default=L.itemsize) * L.chunk_tokens * max(n_chunks, 1)

    def ring_depth(self, n_chunks: int, plan: str) -> int:
        """Layers the loader may hold at once: as many as fit the prefetch budget (at least 2).

        While leading layers are recomputed the loader hides I/O only for as many
        layers as it has buffers, so a deep ring is what lets the two overlap.
        """
        slot = self.slot_bytes(n_chunks, plan)
        return max(2, min(self.layout.num_layers, self.prefetch_bytes // max(slot, 1)))

    def layer_reads(self, digests: list[str], plan: str, recompute_layers: int, known=None,
                    exchange=None, *, skip: int = 0, count: int | None = None) -> list[LayerRead]:
        """What to read per loaded layer (layers `first_read(...)`.. in order): the chunk keys (`known`: keys
        per layer already built) and one chunk's shape; `skip`, `count`: only `count` layers after `skip`."""
        L = self.layout
        known = known or {}
        encoded = None
        reads = []
        first = self.first_read(plan, recompute_layers)
        stop = len(plan) if count is None else min(len(plan), first + skip + count)
        for l in range(first + skip, stop):
            kind = plan[l]
            keys = known.get(l)
            if keys is None:
                encoded = encoded or [d.encode() for d in digests]  # bytes keys, as the lookup builds them
                keys = L.layer_keys(encoded, kind, l)
            if exchange is not None:
                keys = exchange.keys(l, kind, keys)
            reads.append(LayerRead(l, kind, keys, L.chunk_shape(l, kind)))
        return reads

    def open_loader(self, reads: list[LayerRead], n_chunks: int, plan: str, *, where: list | None = None,
                    inline: bool | None = None, expect_reads: int | None = None, start: bool = True) -> LayerLoader:
        """A loader of `reads` over this restorer's ring and copy stream, started unless `start` is False
        (`expect_reads`: an inline loader that will be extended to that many reads)."""
        loader = LayerLoader(self.store, reads, self.layout.dtype, self.device, depth=self.ring_depth(n_chunks, plan),
                             stream=self.copy_stream, ring=self.ring, lookahead=self.inline_lookahead,
                             lease=self.lease_reads, inline=inline, where=where,
                             slot_bytes=self.slot_bytes(n_chunks, plan), expect_reads=expect_reads)
        return loader.start() if start else loader

    def begin(self, digests: list[str], plan: str, recompute_layers: int) -> EarlyLoad | None:
        """Start reading a restore's first layers while the caller still locates the rest.

        On the lent H200 the lookup of a 16K restore (building and locating its 8,192 chunk keys) took
        ~3 ms of host time before the first copy, with the copy engine idle. This builds the keys of the
        layers it queues only (the loader's lookahead), reads them inline (copies queued on a GPU), and
        `restore` extends the loader with the rest. Only when the first loaded layer lies wholly in memory
        tiers, the restore names at least `early_min_keys` keys (None: never), and there is no tensor-parallel exchange
        (it starts with the restore); otherwise None. Pass the result to `restore`, which takes it over or
        cancels it.
        """
        if self.exchange is not None or not digests or self.early_min_keys is None:
            return None
        loaded = len(plan) - self.first_read(plan, recompute_layers)
        if loaded < 1 or loaded * len(digests) < self.early_min_keys:
            return None
        ahead = LayerLoader.queued_ahead(min(self.ring_depth(len(digests), plan), loaded), self.inline_lookahead)
        reads = self.layer_reads(digests, plan, recompute_layers, count=ahead)
        if not MEMORY_TIERS.issuperset(self.store.locate(reads[0].keys)):
            return None
        loader = self.open_loader(reads, len(digests), plan, inline=True, expect_reads=loaded)
        loader.prefetch(ahead)
        return EarlyLoad(loader, len(digests), plan, recompute_layers)

    def _take_over(self, early: EarlyLoad, digests: list[str], plan: str, recompute_layers: int, where) -> bool:
        """Whether `early` reads what this restore would: the same chunks, plan and recomputed layers, and no
        chunk on NVMe (its inline loader would block on the disk, where reader threads overlap it); if so, its
        loader gets the rest of the restore's reads."""
        if (early.chunks, early.plan, early.recompute_layers) != (len(digests), plan, recompute_layers):
            return False
        if where is not None and any("nvme" in where.tiers.get(l, ())
                                    for l in range(self.first_read(plan, recompute_layers), len(plan))):
            return False
        rest = self.layer_reads(digests, plan, recompute_layers, where.keys if where is not None else None,
                                skip=len(early.loader.reads))
        if where is None and "nvme" in self.store.locate([k for read in rest for k in read.keys]):
            return False
        early.loader.extend(rest)
        early.taken = True
        return True

    def restore(self, ids: torch.Tensor, digests: list[str], plan: str, recompute_layers: int, *,
                lazy: bool, where=None, marks=None,
                into: Callable[[int], tuple] | None = None,
                early: EarlyLoad | None = None) -> tuple[Any, int, Callable[[], None]]:
        """(cache, valid chunks, release) for the first len(digests) chunks of `ids` ([1, >= n] on the
        device); `release()` ends a lazy restore's readers once the caller is done with the cache.
        `marks`: told `recomputed()` once the leading layers' recomputation is queued and `restored(read_time)`
        once every layer's work is (lazy: when the model took the last), or None.
        `into(layer)`: (K, V) tensors [1, kv_heads, n, head_dim] a fully read plain layer is written into
        (the captured prefill's static cache, so its forward need not copy the prefix in), or None; its
        `capacity`, if any: rows of those tensors' storage a projection may write (see `project_prefix`).
        `early`: reads `begin` started; taken over when they are this restore's, else cancelled."""
        if early is not None and not self._take_over(early, digests, plan, recompute_layers, where):
            early.cancel()
            early = None
        exchange = self.exchange.begin(plan, digests, recompute_layers, where) if self.exchange else None
        source = PrefixSource(self, ids[:, : len(digests) * self.layout.chunk_tokens], digests, plan,
                              recompute_layers, where, marks, exchange, self.plain_layers, into, early)
        try:
            source.start()
        except BaseException:
            source.close()  # its loader's threads, lease and ring (an early loader taken over included)
            raise
        L = self.layout.num_layers
        if lazy:
            cache = LazyCache.for_model(self.recomputer.model.config)
            for l in range(L):
                if l not in self.plain_layers or not cache.make_lazy(l, source, source.n_tokens, self.layout.dtype,
                                                                     self.device):
                    source.fill(cache, l, must=True)  # a layer kind we do not make lazy (sliding, recurrent): now
            weakref.finalize(cache, source.close)  # a cache dropped before every layer was taken ends its readers
            return cache, len(digests), source.close
        cache = new_cache(self.recomputer.model)
        produced, filled = {}, []
        try:
            for l in range(L):  # in layer order: the loader's ring frees slots in that order
                if l in self.plain_layers:
                    produced[l] = source.produce(l)
                else:
                    filled.append(source.fill(cache, l))
        finally:
            source.close()
        valid = min([p[2] for p in produced.values()] + filled, default=len(digests))
        if valid < len(digests) and filled:
            valid = 0  # only plain K/V layers can be cut back to what was readable: restore nothing, not wrong
        if valid == 0:
            return new_cache(self.recomputer.model), 0, source.close
        rows = valid * self.layout.chunk_tokens
        for l, (k, v, _) in produced.items():
            fill_layer(cache, l, k[..., :rows, :], v[..., :rows, :])
        return cache, valid, source.close

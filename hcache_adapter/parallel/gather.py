"""The all-gather of a layer's hidden state in a tensor-parallel restore.

Single-GPU, a restore reads every chunk of a layer's hidden state and
projects it. Under tensor parallelism every rank needs the whole hidden state
to project its own heads, but the reads need not be repeated: each rank reads
its share (`shards.assign_reads`, its own chunks first, over its own PCIe
link) and an all-gather over the device interconnect (NVLink under NCCL; gloo
between CPU processes) hands every rank the rest. The loader, its ring of
buffers and its read-ahead are the single-GPU restore's own: only the keys a
rank reads and the step between a layer's read and its projection change.

`HiddenExchange` belongs to one model (its group, its comm stream); `begin`
runs once per restore, collectively: the ranks pool which chunks their stores
hold, so all of them assign the reads alike. `RestoreExchange.layer` then runs
per layer, in layer order on every rank: the ranks agree on how many leading
chunks every share read (one small host all-gather), and gather the shares.
K/V layers are not gathered (each rank holds its own heads) but agree on
their valid chunks too, since a layer that must be recomputed is recomputed by
all ranks together (a forward has collectives of its own).

On a GPU the gather runs on a stream of its own that waits only on the
layer's copy, so the gather of layer l+1 overlaps the projection of layer l.
"""
from __future__ import annotations

from typing import Callable

import torch

from hcache_adapter.layout import StateLayout
from hcache_adapter.manifest import HIDDEN
from hcache_adapter.parallel.shards import Assignment, assign_reads, gathered_order
from hcache_adapter.parallel.tp import TensorParallel, all_gather_single


class HiddenExchange:
    """What a tensor-parallel restore needs between reading a layer and projecting it, for one model."""

    def __init__(self, tp: TensorParallel, layout: StateLayout, store, device: torch.device):
        self.tp = tp
        self.layout = layout
        self.store = store
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._orders: dict[tuple, torch.Tensor] = {}

    def begin(self, plan: str, digests: list[str], recompute_layers: int, where=None) -> "RestoreExchange":
        """Collective: pool which hidden-state chunks each rank holds and assign every chunk's read."""
        layers = [l for l, kind in enumerate(plan) if kind == HIDDEN and l >= recompute_layers]
        m = len(digests)
        held: list[int] = []
        for l in layers:
            if where is not None and l in where.tiers:
                tiers = where.tiers[l]
            else:
                tiers = self.store.locate(self.layout.layer_keys(digests, HIDDEN, l))
            held += [int(t is not None) for t in tiers]
        table = self.tp.gather_ints(held) if held else [[] for _ in range(self.tp.world)]
        assignments = {l: assign_reads([[bool(x) for x in row[i * m:(i + 1) * m]] for row in table])
                       for i, l in enumerate(layers)}
        return RestoreExchange(self, assignments)

    def order(self, assignment: Assignment, valid: int) -> torch.Tensor:
        """The gathered rows of chunks 0..valid-1 as an index on the device (cached: restores repeat)."""
        key = (assignment, valid)
        idx = self._orders.get(key)
        if idx is None:
            if len(self._orders) > 256:
                self._orders.clear()
            idx = self._orders[key] = torch.tensor(gathered_order(assignment, valid), device=self.device)
        return idx


class RestoreExchange:
    """One restore's reads and gathers (handed to `PrefixSource`)."""

    def __init__(self, exchange: HiddenExchange, assignments: dict[int, Assignment]):
        self.x = exchange
        self.assignments = assignments

    def keys(self, layer: int, kind: str, keys: list[bytes]) -> list[bytes]:
        """The keys this rank reads of `layer` (its share of a hidden-state layer; all of a K/V layer)."""
        a = self.assignments.get(layer)
        if kind != HIDDEN or a is None:
            return keys
        return [keys[c] for c in a.chunks_of(self.x.tp.rank)]

    def layer(self, layer: int, kind: str, get: Callable[[], object]) -> tuple[torch.Tensor, int]:
        """(data, valid chunks) of one loaded layer, the same `valid` on every rank. `get()` is the loader's
        read of this rank's keys (blocking until read; on a GPU the current stream waits for its copy)."""
        tp = self.x.tp
        a = self.assignments.get(layer)
        if kind != HIDDEN or a is None:
            loaded = get()
            return loaded.data, tp.agree_min(loaded.valid_chunks)
        stream = self.x.stream
        if stream is None:
            return self._gather(a, get)
        current = torch.cuda.current_stream(self.x.device)
        with torch.cuda.stream(stream):  # waits only on this layer's copy, not on the projections queued before
            data, valid = self._gather(a, get)
            done = torch.cuda.Event()
            done.record(stream)
        current.wait_event(done)
        data.record_stream(current)
        return data, valid

    def _gather(self, a: Assignment, get) -> tuple[torch.Tensor, int]:
        tp = self.x.tp
        loaded = get()
        share_valid = [row[0] for row in tp.gather_ints([loaded.valid_chunks])]
        valid = a.valid_chunks(share_valid)
        share = loaded.data
        if valid == 0:
            return share[:0], 0
        k = a.share_rows
        chunk_shape = tuple(share.shape[1:])
        if share.shape[0] != k or not share.is_contiguous():  # a smaller share: pad it to the common size
            padded = share.new_empty((k, *chunk_shape))
            padded[: share.shape[0]].copy_(share)
            share = padded
        out = share.new_empty((tp.world * k, *chunk_shape))
        # Bytes, not values: the gather only moves data, and gloo lacks some float types NCCL has.
        all_gather_single(_bytes(out), _bytes(share), group=tp.group)
        return out.index_select(0, self.x.order(a, valid)), valid


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1).view(torch.uint8)

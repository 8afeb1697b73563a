"""Finding what of a request is stored: the longest stored prefix, and where its chunks are.

A chunk counts when its manifest is present, describes state this layout can
restore, and agrees with the chunks before it on the plan. The layer entries are
located (which tier would serve each) so the planner can weigh tiers and the
loader need not locate them again; they are still verified when read.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from hcache_adapter.layout import StateLayout
from hcache_adapter.manifest import RECOMPUTE, Manifest

log = logging.getLogger(__name__)


class ManifestCache:
    """Decoded manifests of chunks found recently, by store key (at most `size`, least recently used out).

    State evicted to NVMe has its manifests there too: without this, every lookup
    of it reads two of them from the disk (a round trip each, ~1-2 ms on the lent
    virtual disk) before the restore can start, or before auto decides to
    recompute everything. Presence is still asked of the store's index on every
    lookup. A cached manifest is stale only if its chunk was saved again with
    another plan; the layer keys it names are then missing (the prefix ends
    there, a miss, and `discard` drops it) or still hold that plan's state of
    the same tokens, verified when read. Never wrong data, at worst a miss.
    """

    def __init__(self, size: int = 4096):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = size
        self._entries: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, store, keys: list) -> list[Manifest | None]:
        """The manifests of `keys`: cached ones as they are, the others read from `store` (and kept)."""
        out = [self._entries.get(k) for k in keys]
        missing = [i for i, man in enumerate(out) if man is None]
        if missing:
            for i, raw in zip(missing, store.get_many([keys[i] for i in missing])):
                out[i] = Manifest.decode(raw)
                if out[i] is not None and self.size:
                    self._entries[keys[i]] = out[i]
        for k in keys:
            if k in self._entries:
                self._entries.move_to_end(k)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return out

    def discard(self, keys) -> None:
        for k in keys:
            self._entries.pop(k, None)


def stored_prefix(store, layout: StateLayout, digests: list[str],
                  manifests: ManifestCache | None = None) -> tuple[str, int]:
    """(plan, m): the plan and number of leading chunks whose manifests are present and of one plan.

    Only the first and the last present manifest are read (a few reads, not one
    per chunk, which from NVMe costs a disk round trip each), through `manifests`
    when given: a chunk in between saved with another plan has other layer keys,
    which `locate_layers` finds missing, and the prefix ends there.
    """
    keys = [layout.manifest_key(d) for d in digests]
    m = 0
    for where in store.locate(keys):
        if where is None:
            break
        m += 1
    if m == 0:
        return "", 0
    ends = [keys[0]] if m == 1 else [keys[0], keys[m - 1]]
    mans = (manifests.get_many(store, ends) if manifests is not None
            else [Manifest.decode(raw) for raw in store.get_many(ends)])
    first = mans[0]
    if not layout.accepts(first):
        if first is not None and first.fingerprint != layout.fingerprint:
            log.warning("restore: the stored prefix was saved by another model; ignored")
        return "", 0
    last = mans[-1]
    if not layout.accepts(last) or last.plan != first.plan:
        return _agreeing_prefix(store, layout, keys[:m], first.plan)
    return first.plan, m


def _agreeing_prefix(store, layout: StateLayout, keys: list[str], plan: str) -> tuple[str, int]:
    """The slow path when the ends disagree: read every manifest and stop at the first that differs."""
    for i, raw in enumerate(store.get_many(keys)):
        man = Manifest.decode(raw)
        if not layout.accepts(man) or man.plan != plan:
            return plan, i
    return plan, len(keys)


def complete_chunks(locations: "LayerLocations") -> int:
    """Leading chunks every stored layer has (a chunk missing in any layer ends the prefix)."""
    m = min((len(t) for t in locations.tiers.values()), default=0)
    for tiers in locations.tiers.values():
        head = tiers[:m]
        if None in head:  # searched in C: a 16K restore has 8,192 chunk entries
            m = head.index(None)
    return m


@dataclass(frozen=True)
class LayerLocations:
    """Per stored layer: its chunk keys, and the tier that would serve each (None: absent)."""

    keys: dict[int, list[bytes]]
    tiers: dict[int, list]


def locate_layers(store, layout: StateLayout, plan: str, digests: list[str]) -> tuple[LayerLocations, dict[str, int]]:
    """(keys and tier of every chunk per stored layer, bytes each tier would deliver; "missing" for absent)."""
    layers = [l for l, kind in enumerate(plan) if kind != RECOMPUTE]
    encoded = [d.encode() for d in digests]  # once, not once per layer: the keys are built as bytes
    per_layer = {l: layout.layer_keys(encoded, plan[l], l) for l in layers}
    found = store.locate([k for l in layers for k in per_layer[l]])
    m = len(digests)
    where = {l: found[i * m:(i + 1) * m] for i, l in enumerate(layers)}
    sources: dict[str, int] = {}
    for l in layers:
        per_chunk = layout.bytes_per_token(l, plan[l]) * layout.chunk_tokens
        tiers = where[l]
        for tier in set(tiers):  # a few tiers, thousands of chunks: counted in C
            name = tier or "missing"
            sources[name] = sources.get(name, 0) + tiers.count(tier) * per_chunk
    return LayerLocations(per_layer, where), sources


def last_layer_tiers(store, layout: StateLayout, plan: str, digests: list[str]) -> set:
    """The tiers holding the chunks of the last stored layer of `plan` (None among them: some absent).

    A cheap look at where a prefix lives before locating every layer: a
    restore reads that layer last, so recency-ordered eviction moves it to NVMe
    last; when it is wholly on NVMe, the prefix almost surely is (a 16K restore
    of a 7B has 8,192 chunk entries to locate, ~4 ms on the lent H200; its last
    layer 256)."""
    stored = [l for l, kind in enumerate(plan) if kind != RECOMPUTE]
    if not stored or not digests:
        return set()
    last = stored[-1]
    return set(store.locate(layout.layer_keys([d.encode() for d in digests], plan[last], last)))

"""The tier ladder: the store's tiers in read order, and the moves between them.

Rungs are the local tiers, fastest first (GPU memory, pinned DRAM, NVMe); an optional
remote tier hangs below them and is not a rung (the catalog does not own its contents).
The ladder does what crosses tiers: making room in an arena tier by evicting (and, for
the last copy of a value, demoting it to the next arena below instead of losing it),
promoting a value just read into faster tiers, routing a location back to the tier that
owns it, and describing the tiers to callers. Adding a tier is adding a rung: nothing
here names a tier.

Methods ending in `_locked` expect the caller to hold `catalog.lock` (the ladder takes no
lock of its own besides what `promote` takes around its copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hstore.buffers import as_bytes, copy_bytes
from hstore.catalog import Catalog
from hstore.entry import NEEDS_DURABLE, Entry
from hstore.stats import StoreStats, TierStats
from hstore.tiers.base import ArenaTier, DurableTier, Location, RemoteTier


@dataclass(eq=False)
class Rung:
    """One local tier on the ladder."""

    index: int
    tier: ArenaTier | DurableTier
    stats: TierStats

    @property
    def name(self) -> str:
        return self.tier.name

    @property
    def durable(self) -> bool:
        return isinstance(self.tier, DurableTier)


class TierView:
    """A read-only description of one tier for callers: `store.tiers`, `store.tier(name)`.

    Live: `used` and `free` read the tier when asked.
    """

    __slots__ = ("_tier", "kind", "order")

    def __init__(self, tier, kind: str, order: int):
        self._tier = tier
        self.kind = kind
        """"memory" (GPU, DRAM), "durable" (NVMe) or "remote"."""
        self.order = order
        """Position in read order (0 is read first)."""

    @property
    def name(self) -> str:
        return self._tier.name

    @property
    def persistent(self) -> bool:
        return self.kind == "durable"

    @property
    def device(self) -> torch.device | None:
        """The torch device of a memory tier's arena (None for others)."""
        return getattr(self._tier, "device", None) if self.kind == "memory" else None

    @property
    def capacity(self) -> int | None:
        """Bytes the tier can hold (None for a remote tier: its server decides)."""
        return self._tier.capacity if self.kind != "remote" else None

    @property
    def used(self) -> int | None:
        return self._tier.used if self.kind != "remote" else None

    @property
    def free(self) -> int | None:
        return None if self.kind == "remote" else self._tier.capacity - self._tier.used

    def footprint(self, nbytes: int) -> int:
        """Bytes an item of `nbytes` occupies on this tier (alignment, headers)."""
        return self._tier.footprint(nbytes) if self.kind != "remote" else nbytes

    @property
    def max_item_bytes(self) -> int | None:
        """The largest item the tier can ever hold."""
        if self.kind == "durable":
            return self._tier.max_item_bytes
        return self._tier.capacity if self.kind == "memory" else None

    def __repr__(self) -> str:
        return f"TierView({self.name!r}, kind={self.kind!r}, capacity={self.capacity}, used={self.used})"


class TierLadder:
    """The rungs, fastest first, plus an optional remote tier below them."""

    def __init__(self, tiers: Sequence[ArenaTier | DurableTier], stats: StoreStats, *,
                 landing: str = "dram", remote: RemoteTier | None = None):
        self.rungs = [Rung(i, t, stats.tier(t.name)) for i, t in enumerate(tiers)]
        self._by_name = {r.name: r for r in self.rungs}
        self.landing = self._by_name[landing]
        self.durable = next((r for r in self.rungs if r.durable), None)
        self.remote = remote
        self.stats = stats
        if remote is not None:
            stats.tier(remote.name)
        self.catalog: Catalog | None = None

    def attach(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # ------------------------------------------------------------------ lookups
    def rung(self, name: str) -> Rung | None:
        return self._by_name.get(name)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rungs]

    def free(self, loc: Location) -> None:
        """Give `loc` back to the tier that made it (the catalog's free callback)."""
        self._by_name[loc.tier].tier.free(loc)

    def view(self, loc: Location) -> torch.Tensor:
        return self._by_name[loc.tier].tier.view(loc)

    def describe(self) -> tuple[TierView, ...]:
        views = [TierView(r.tier, "durable" if r.durable else "memory", r.index) for r in self.rungs]
        if self.remote is not None:
            views.append(TierView(self.remote, "remote", len(self.rungs)))
        return tuple(views)

    def arenas_below(self, rung: Rung) -> list[Rung]:
        return [r for r in self.rungs[rung.index + 1:] if not r.durable]

    def promotion_targets(self, src: int, out_device: torch.device) -> list[Rung]:
        """Arena rungs above `src` a value just read should be copied into: the landing tier,
        and faster tiers on the device type the caller reads to."""
        return [r for r in self.rungs[:src] if not r.durable
                and (r is self.landing or r.tier.device.type == out_device.type)]

    # ------------------------------------------------------------------ eviction (catalog.lock held)
    def allocate_evicting_locked(self, rung: Rung, nbytes: int) -> Location | None:
        """A slot on an arena rung, evicting what it takes; None when nothing more can be evicted now."""
        tier = rung.tier
        while True:
            loc = tier.allocate(nbytes)
            if loc is not None or not self.evict_one_locked(rung):
                return loc

    def evict_one_locked(self, rung: Rung) -> bool:
        """Evict one value's copy from an arena rung; False when nothing can be evicted now."""
        cat = self.catalog
        entries, i = cat.entries, rung.index
        landing = rung is self.landing

        def unevictable(k: bytes) -> bool:
            e = entries.get(k)
            if e is None:
                return False
            loc = e.copies[i]
            return (loc is None or cat.pinned(loc)
                    or (landing and (e.pending or (e.ready is not None and not e.ready.query()))))

        victim = cat.policies[i].pop_victim(skip=unevictable)
        if victim is None:
            return False
        e = entries.get(victim)
        loc = e.copies[i] if e is not None else None
        if loc is None:
            return True  # a stale policy entry; try again
        rung.stats.evictions += 1
        cat.drop_copy_locked(e, i)
        if e.best < 0 and self._demote_locked(e, rung, loc):
            rung.stats.demotions += 1
        rung.tier.free(loc)
        cat.forget_if_empty_locked(e)
        return True

    def _demote_locked(self, e: Entry, rung: Rung, loc: Location) -> bool:
        """Write back the last copy of a value to the next arena rung below (instead of losing it)."""
        for below in self.arenas_below(rung):
            dst = self.allocate_evicting_locked(below, e.nbytes)
            if dst is None:
                continue
            copy_bytes(below.tier.view(dst), rung.tier.view(loc))
            self.catalog.add_copy_locked(e, below.index, dst)
            if below is self.landing and self.durable is not None and e.nbytes <= self.durable.tier.max_item_bytes:
                if e.memory_only:  # a written-back copy is made durable after all
                    e.memory_only = False
                    self.catalog.memory_only.pop(e.key, None)
                self.catalog.mark_pending_locked(e, NEEDS_DURABLE)
            return True
        return False

    # ------------------------------------------------------------------ promotion
    def promote(self, e: Entry, rung: Rung, src: torch.Tensor) -> bool:
        """Copy a value just read into an arena rung if room can be made without waiting."""
        tier, cat = rung.tier, self.catalog
        if tier.footprint(e.nbytes) > tier.capacity:
            return False  # can never fit: served from where it is
        with cat.lock:
            if cat.closed or cat.entries.get(e.key) is not e or e.copies[rung.index] is not None:
                return False
            loc = self.allocate_evicting_locked(rung, e.nbytes)
            if loc is None:
                return False
            cat.pin_locked([loc])
        copy_bytes(tier.view(loc), as_bytes(src))
        with cat.lock:
            cat.unpin_locked([loc])
            if cat.entries.get(e.key) is e and e.copies[rung.index] is None and not cat.closed:
                cat.add_copy_locked(e, rung.index, loc)
                rung.stats.promotions += 1
                rung.stats.bytes_written += e.nbytes
                return True
            tier.free(loc)
            return False

    # ------------------------------------------------------------------ stats
    def occupancy(self) -> dict[str, dict]:
        out = {}
        for r in self.rungs:
            out[r.name] = dict(capacity=r.tier.capacity, used=r.tier.used, items=len(self.catalog.policies[r.index]))
        return out

"""Admission policies: whether an item is worth writing to a tier at all.

Why: flash wears with every write and a slow tier's bandwidth is scarce, so
writing an item that will never be read again costs twice (the write itself,
and the useful item it evicts). CacheLib's navy puts an admission filter in
front of its flash engine for this reason; these are the simple ones.
Admission policies never see tiers; they see the key, its size and the cost
hint. Not thread-safe (the store locks).
"""
from __future__ import annotations

import random
from collections import OrderedDict

from hstore.errors import StoreConfigError
from hstore.policy.base import AdmissionPolicy


class AdmitAll(AdmissionPolicy):
    """Admit everything: the right default for tiers that do not wear (DRAM, GPU)."""

    name = "all"

    def admit(self, key: bytes, size: int, cost: float | None = None) -> bool:
        return True


class SizeLimitAdmission(AdmissionPolicy):
    """Admit items of at most `max_bytes`.

    One huge item can evict hundreds of small ones; capping the size keeps a
    tier for the items it serves best.
    """

    name = "size-limit"

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise StoreConfigError(f"size-limit max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes

    def admit(self, key: bytes, size: int, cost: float | None = None) -> bool:
        return size <= self.max_bytes


class SecondHitAdmission(AdmissionPolicy):
    """A doorkeeper: refuse a key the first time it is offered, admit it if it comes back.

    One-hit wonders, which are most keys of most workloads, are offered once
    and so never reach the tier. The first offer of a key is remembered in a
    FIFO of the last `window` distinct keys offered; a key offered while
    remembered is admitted (and its memory refreshed, so a key offered often
    stays admitted). Once forgotten, a key must prove itself again.

    To keep memory small whatever the key length, the window holds Python
    hashes of keys, not keys: a collision only admits a key early, which is
    the harmless direction.
    """

    name = "second-hit"

    def __init__(self, window: int = 1 << 16) -> None:
        if window < 1:
            raise StoreConfigError(f"second-hit window must be >= 1, got {window}")
        self.window = window
        self._seen: OrderedDict[int, None] = OrderedDict()

    def admit(self, key: bytes, size: int, cost: float | None = None) -> bool:
        h = hash(key)
        if h in self._seen:
            self._seen.move_to_end(h)
            return True
        self._seen[h] = None
        if len(self._seen) > self.window:
            self._seen.popitem(last=False)
        return False


class ProbabilisticAdmission(AdmissionPolicy):
    """Admit each offer with probability `p`.

    A cheap way to cap the write rate of a tier to a fraction of the offered
    rate (navy's "random" admission); hot keys, offered often, still get in
    quickly. `seed` makes runs reproducible.
    """

    name = "probabilistic"

    def __init__(self, p: float, seed: int | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise StoreConfigError(f"probabilistic admission p must be in [0, 1], got {p}")
        self.p = p
        self._rng = random.Random(seed)

    def admit(self, key: bytes, size: int, cost: float | None = None) -> bool:
        return self._rng.random() < self.p

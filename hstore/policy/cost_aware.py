"""Cost-aware eviction: GreedyDual-Size-Frequency (Cherkasova, 1998).

Why: the entries of a tensor store are not equally dear to lose. A chunk that
takes 50 ms of GPU time to recompute is worth more tier space than one that
takes 1 ms, and, at equal cost, one big chunk frees the room of many small
ones. GDSF gives each key the priority

    H = L + freq * cost / size

and evicts the key with the smallest H. `L`, the "inflation" clock, is raised
to the H of each victim, so a key that was valuable long ago but is no longer
hit is eventually overtaken by newer keys (aging without timestamps).

Keys live in a binary heap with lazy invalidation: a hit pushes a fresh
(H, stamp) pair and leaves the old one to be discarded when it surfaces, so
every operation is O(log n); the heap is rebuilt when stale pairs outnumber
live ones, which bounds its memory at about twice the tracked set.
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Callable

from hstore.errors import StoreConfigError
from hstore.policy.base import EvictionPolicy, check_size

_FALLBACK_COST = 1.0


@dataclass
class _Entry:
    size: int
    cost: float
    freq: int
    priority: float
    stamp: int  # matches exactly one heap pair, the live one


def _check_cost(cost: float) -> float:
    if not (math.isfinite(cost) and cost >= 0.0):
        raise ValueError(f"cost hint must be a finite number >= 0, got {cost}")
    return float(cost)


class CostAwarePolicy(EvictionPolicy):
    """Evicts the key with the least `L + freq * cost / size`. Not thread-safe (the store locks).

    `cost` is the store's restore-cost hint (e.g. seconds to recompute or
    reload the entry); only ratios between costs matter.

    Default cost. A key inserted with `cost=None` gets `default_cost` if one
    was given, else the mean of the explicit hints seen so far, else 1.0.
    The mean, rather than a fixed 1.0, is the default because hints come in
    the caller's units (seconds, FLOPs, ...): a fixed constant would make
    unhinted keys look arbitrarily dear or cheap next to hinted ones, while
    the mean treats them as typical. With no hints at all every cost is 1.0
    and the policy is plain GDSF, which favours small, frequently hit keys
    (the object hit ratio). Re-inserting a key with `cost=None` keeps its
    previous cost.

    Sizes are in bytes; a zero-byte key is treated as one byte.
    """

    name = "cost"

    def __init__(self, default_cost: float | None = None) -> None:
        if default_cost is not None and not (math.isfinite(default_cost) and default_cost >= 0):
            raise StoreConfigError(f"cost default_cost must be a finite number >= 0, got {default_cost}")
        self.default_cost = default_cost
        self._entries: dict[bytes, _Entry] = {}
        self._heap: list[tuple[float, int, bytes]] = []
        self._stamps = itertools.count()
        self._inflation = 0.0  # the L of GDSF
        self._hint_sum = 0.0
        self._hint_count = 0

    @property
    def heap_size(self) -> int:
        """Pairs in the heap, live and stale: kept within about twice the tracked keys."""
        return len(self._heap)

    @property
    def inflation(self) -> float:
        """GDSF's L: the priority of the last victim (never decreases)."""
        return self._inflation

    # -- interface -----------------------------------------------------------

    def check_cost(self, cost: float | None) -> None:
        if cost is not None:
            _check_cost(cost)

    def insert(self, key: bytes, size: int, cost: float | None = None) -> None:
        check_size(size)
        if cost is not None:
            cost = _check_cost(cost)
            self._hint_sum += cost
            self._hint_count += 1
        entry = self._entries.get(key)
        if entry is None:
            resolved = cost if cost is not None else self._default_cost()
            entry = _Entry(size, resolved, 0, 0.0, 0)
            self._entries[key] = entry
        else:
            entry.size = size
            if cost is not None:
                entry.cost = cost
        self._hit(key, entry)

    def access(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._hit(key, entry)

    def remove(self, key: bytes) -> None:
        # Its heap pair goes stale and is dropped when it surfaces.
        if self._entries.pop(key, None) is not None:
            self._maybe_compact()

    def pop_victim(self, skip: Callable[[bytes], bool] | None = None) -> bytes | None:
        passed_over: list[tuple[float, int, bytes]] = []
        victim: bytes | None = None
        while self._heap:
            pair = heapq.heappop(self._heap)
            priority, stamp, key = pair
            entry = self._entries.get(key)
            if entry is None or entry.stamp != stamp:
                continue  # stale
            if skip is not None and skip(key):
                passed_over.append(pair)
                continue
            victim = key
            del self._entries[key]
            # max(): with skipped keys the victim need not be the minimum, and
            # L must not move backwards once a skipped key is evicted later.
            self._inflation = max(self._inflation, priority)
            break
        for pair in passed_over:
            heapq.heappush(self._heap, pair)
        return victim

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    # -- internals -----------------------------------------------------------

    def _default_cost(self) -> float:
        if self.default_cost is not None:
            return self.default_cost
        if self._hint_count:
            return self._hint_sum / self._hint_count
        return _FALLBACK_COST

    def _hit(self, key: bytes, entry: _Entry) -> None:
        entry.freq += 1
        entry.priority = self._inflation + entry.freq * entry.cost / max(entry.size, 1)
        entry.stamp = next(self._stamps)
        heapq.heappush(self._heap, (entry.priority, entry.stamp, key))
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        """Rebuild the heap from live entries once stale pairs dominate it."""
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(e.priority, e.stamp, k) for k, e in self._entries.items()]
            heapq.heapify(self._heap)

"""Least-recently-used eviction.

The baseline every other policy is measured against: cheap (an OrderedDict
gives O(1) insert/access/remove and O(1) victim choice when nothing is
skipped) and good for recency-heavy workloads, but a single scan of cold keys
larger than the tier flushes the whole hot set (see `S3FifoPolicy`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from hstore.policy.base import EvictionPolicy, check_size


class LruPolicy(EvictionPolicy):
    """Evicts the key touched least recently. Not thread-safe (the store locks).

    Cost hints are ignored and sizes only checked (>= 0, like every policy):
    LRU orders by time alone.
    """

    name = "lru"

    def __init__(self) -> None:
        # Oldest first: the head is the next victim.
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, size: int, cost: float | None = None) -> None:
        check_size(size)
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def access_many(self, keys) -> None:
        move = self._order.move_to_end
        for key in keys:  # a lease touches thousands of keys: one lookup each (unknown keys are rare)
            try:
                move(key)
            except KeyError:
                pass

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def pop_victim(self, skip: Callable[[bytes], bool] | None = None) -> bytes | None:
        # Skipped keys keep their place: a pinned key stays the oldest and is
        # evicted as soon as it is unpinned, which is what LRU would have done.
        for key in self._order:
            if skip is None or not skip(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

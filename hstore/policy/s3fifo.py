"""S3-FIFO eviction (Yang et al., "FIFO queues are all you need for cache
eviction", SOSP'23).

Why: most keys in a cache are touched once and never again ("one-hit
wonders"), and a long scan of such keys is exactly what empties an LRU tier of
its hot set. S3-FIFO admits new keys into a small probationary FIFO and only
promotes the ones that were hit while there; a ghost FIFO remembers keys
recently dropped from probation so that a key which comes back soon goes
straight to the main FIFO. Every operation is O(1) amortised, with no list
splicing on hits (a hit only bumps a 2-bit counter).

Sizing. The paper sizes the small queue at 10% of the cache's capacity, but a
policy here does not know the tier's capacity (policies know nothing of
tiers). We size it relative to the bytes currently tracked instead: victims
come from the small queue while it holds more than `small_ratio` of the
tracked bytes. The store asks for victims only when the tier is full, when
tracked bytes are the capacity, so in steady state this is the paper's rule.
The ghost queue likewise holds at most `ghost_ratio` of the tracked bytes
(counted at the ghosts' sizes when they were evicted), so its memory stays
bounded by the tier's own population.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from hstore.errors import StoreConfigError
from hstore.policy.base import EvictionPolicy, check_size

_MAX_FREQ = 3  # 2-bit saturating counter, as in the paper


@dataclass
class _Entry:
    size: int
    freq: int
    in_main: bool


class S3FifoPolicy(EvictionPolicy):
    """Scan-resistant eviction with a small, a main and a ghost FIFO.

    Not thread-safe (the store locks). Cost hints are ignored.

    Args:
        small_ratio: share of the tracked bytes the small (probation) FIFO may
            hold before victims are taken from it; the paper's 10% default.
        ghost_ratio: bytes of recently evicted-from-small keys to remember, as
            a share of the tracked bytes; the paper's 90% (the main queue).
    """

    name = "s3fifo"

    def __init__(self, small_ratio: float = 0.1, ghost_ratio: float = 0.9) -> None:
        if not 0.0 < small_ratio < 1.0:
            raise StoreConfigError(f"s3fifo small_ratio must be in (0, 1), got {small_ratio}")
        if not ghost_ratio >= 0.0:
            raise StoreConfigError(f"s3fifo ghost_ratio must be >= 0, got {ghost_ratio}")
        self.small_ratio = small_ratio
        self.ghost_ratio = ghost_ratio
        self._entries: dict[bytes, _Entry] = {}
        # FIFOs, oldest first. Values are unused; OrderedDict gives O(1)
        # removal from the middle, which `remove` needs.
        self._small: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._ghost: OrderedDict[bytes, int] = OrderedDict()  # key -> size
        self._small_bytes = 0
        self._main_bytes = 0
        self._ghost_bytes = 0

    # -- interface -----------------------------------------------------------

    def insert(self, key: bytes, size: int, cost: float | None = None) -> None:
        check_size(size)
        entry = self._entries.get(key)
        if entry is not None:  # re-insert: new size, and it counts as a hit
            self._account(entry, -entry.size)
            entry.size = size
            self._account(entry, size)
            entry.freq = min(entry.freq + 1, _MAX_FREQ)
            return
        ghost_size = self._ghost.pop(key, None)
        if ghost_size is not None:
            # Came back soon after being dropped from probation: it is not a
            # one-hit wonder, skip probation.
            self._ghost_bytes -= ghost_size
            entry = _Entry(size, 0, in_main=True)
            self._main[key] = None
        else:
            entry = _Entry(size, 0, in_main=False)
            self._small[key] = None
        self._entries[key] = entry
        self._account(entry, size)

    def access(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.freq = min(entry.freq + 1, _MAX_FREQ)

    def remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        (self._main if entry.in_main else self._small).pop(key)
        self._account(entry, -entry.size)

    def pop_victim(self, skip: Callable[[bytes], bool] | None = None) -> bytes | None:
        small_first = (
            not self._main
            or self._small_bytes > self.small_ratio * (self._small_bytes + self._main_bytes)
        )
        order = (self._evict_small, self._evict_main) if small_first else (self._evict_main, self._evict_small)
        # Everything in one queue skipped: fall back to the other rather than report a full tier.
        # A second round, because a pass over probation may promote its only unskipped keys to
        # main (they were hit) and find no victim: main then holds them with their counters reset.
        for _ in range(2):
            for evict in order:
                victim = evict(skip)
                if victim is not None:
                    return victim
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    # -- internals -----------------------------------------------------------

    def _account(self, entry: _Entry, delta: int) -> None:
        if entry.in_main:
            self._main_bytes += delta
        else:
            self._small_bytes += delta

    def _evict_small(self, skip: Callable[[bytes], bool] | None) -> bytes | None:
        """Drop the oldest unhit probationary key; promote hit ones on the way.

        Skipped keys are rotated to the tail of the small queue; each key is
        looked at once, so the loop ends even if everything is skipped.
        """
        for _ in range(len(self._small)):
            key, _ = self._small.popitem(last=False)
            entry = self._entries[key]
            if skip is not None and skip(key):
                self._small[key] = None
                continue
            if entry.freq > 0:
                # Promotion resets the counter: main's second chances must be
                # earned by hits after promotion.
                self._account(entry, -entry.size)
                entry.in_main, entry.freq = True, 0
                self._account(entry, entry.size)
                self._main[key] = None
                continue
            del self._entries[key]
            self._small_bytes -= entry.size
            self._remember(key, entry.size)
            return key
        return None

    def _evict_main(self, skip: Callable[[bytes], bool] | None) -> bytes | None:
        """Drop the oldest main key with no hits left; hit keys get freq-1 and go round again.

        Each full pass either finds a victim or lowers every unskipped
        counter, so at most `_MAX_FREQ + 1` passes run; a pass that meets only
        skipped keys ends the search.
        """
        while self._main:
            unskipped = False
            for _ in range(len(self._main)):
                key, _ = self._main.popitem(last=False)
                if skip is not None and skip(key):
                    self._main[key] = None
                    continue
                unskipped = True
                entry = self._entries[key]
                if entry.freq > 0:
                    entry.freq -= 1
                    self._main[key] = None
                    continue
                del self._entries[key]
                self._main_bytes -= entry.size
                return key
            if not unskipped:
                return None
        return None

    def _remember(self, key: bytes, size: int) -> None:
        """Add `key` to the ghost FIFO and trim it to its byte budget."""
        # Zero-byte items count as one byte so the ghost stays bounded in length too.
        size = max(size, 1)
        self._ghost[key] = size
        self._ghost_bytes += size
        budget = self.ghost_ratio * (self._small_bytes + self._main_bytes)
        while self._ghost and self._ghost_bytes > budget:
            _, old = self._ghost.popitem(last=False)
            self._ghost_bytes -= old

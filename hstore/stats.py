"""Counters a TieredStore keeps: per tier, and for the store as a whole."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    promotions: int = 0
    demotions: int = 0


@dataclass
class StoreStats:
    puts: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    deletes: int = 0
    dropped: int = 0  # items evicted from their last copy (a cache's normal loss)
    corrupt_chunks: int = 0
    io_errors: int = 0
    flushes: int = 0
    flush_failures: int = 0
    bytes_put: int = 0
    bytes_flushed: int = 0
    memory_only_puts: int = 0  # puts the durable tier will never hold (declined by admission, or too large)
    remote_writes_dropped: int = 0  # values the remote tier did not take (unreachable, full); local tiers keep them
    bytes_shared: int = 0  # bytes written to the remote tier
    tiers: dict[str, TierStats] = field(default_factory=dict)

    def tier(self, name: str) -> TierStats:
        return self.tiers.setdefault(name, TierStats())

    def snapshot(self) -> dict:
        return asdict(self)

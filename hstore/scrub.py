"""Reading back durable records to check them, without serving or dropping anything (`hstore verify`).

Records are read in (device, offset) order, `batch_bytes` of payload at a time, through the
durable tier's own `read_many`, which checks each record's header, key, dtype, shape and
payload checksum exactly as a serving read would.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from hstore.buffers import align_up, aligned_empty
from hstore.index import IndexEntry
from hstore.tiers.base import DurableRead, DurableTier, Location, ReadStatus


def batches(entries: Sequence[IndexEntry], batch_bytes: int) -> Iterable[list[IndexEntry]]:
    """Entries in (device, offset) order, cut into runs of at most `batch_bytes` of payload buffers."""
    batch: list[IndexEntry] = []
    size = 0
    for e in sorted(entries, key=lambda e: (e.device, e.offset)):
        need = align_up(max(e.nbytes, 1))
        if batch and size + need > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(e)
        size += need
    if batch:
        yield batch


def verify_records(tier: DurableTier, entries: Sequence[IndexEntry], batch_bytes: int) -> Iterator[tuple[IndexEntry, ReadStatus]]:
    """(entry, status) for every entry, read back in batches into one reused aligned buffer."""
    buffer = aligned_empty(batch_bytes, pin=False) if entries else None
    for batch in batches(entries, batch_bytes):
        need = sum(align_up(max(e.nbytes, 1)) for e in batch)
        buf = buffer if need <= batch_bytes else aligned_empty(need, pin=False)
        reads, off = [], 0
        for e in batch:
            loc = Location(tier.name, e.device, e.offset, e.length, e.nbytes, e.checksum)
            reads.append(DurableRead(e.key, e.dtype, e.shape, loc, buf.narrow(0, off, e.nbytes)))
            off += align_up(max(e.nbytes, 1))
        yield from zip(batch, tier.read_many(reads))

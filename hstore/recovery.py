"""Rebuilding a lost or damaged index from the data files' record headers.

Format 2 records carry their key, dtype, shape, checksum and a write sequence number, so
the index is a cache of what the data files already say. A rebuild keeps, per key, the
verified record written last (an overwrite leaves the older record on disk until its
space is reused). Records whose header holds only a digest of the key (every format 1
record, and format 2 records of keys longer than `MAX_INLINE_KEY`) cannot be given back
their key: they are counted and left out.

Known limit, by design of header-only recovery: a key deleted (or evicted) whose record
space was not reused yet comes back. Values are exactly as put for that key, never wrong.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hstore.index import Index, IndexEntry
from hstore.tiers.base import DurableTier, ScannedRecord

log = logging.getLogger(__name__)

_BATCH = 10_000


@dataclass
class RecoveryReport:
    """What a rebuild found in the data files."""

    records: int = 0  # records whose header and checksum verify
    recovered: int = 0  # keys indexed again
    superseded: int = 0  # older records of a key that has a newer one
    digest_only: int = 0  # records whose header names the key only by digest (format 1, very long keys)
    moved_aside: str | None = None  # where the damaged index was moved (kept, never deleted)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(records=self.records, recovered=self.recovered, superseded=self.superseded,
                    digest_only=self.digest_only, moved_aside=self.moved_aside, seconds=round(self.seconds, 3))


def move_aside(index_dir: Path) -> Path | None:
    """Rename a damaged index folder out of the way (ROOT/index.damaged-<time>); None if there is none."""
    if not index_dir.exists():
        return None
    target = index_dir.with_name(f"{index_dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    index_dir.rename(target)
    log.warning("moved the damaged index %s to %s", index_dir, target)
    return target


def rebuild_index(index: Index, tier: DurableTier, report: RecoveryReport | None = None) -> RecoveryReport:
    """Index every key's newest verified record found by `tier.scan()` (an empty index expected)."""
    report = report or RecoveryReport()
    start = time.perf_counter()
    newest: dict[bytes, ScannedRecord] = {}
    for rec in tier.scan():
        report.records += 1
        if rec.key is None:
            report.digest_only += 1
            continue
        old = newest.get(rec.key)
        if old is None or rec.seq > old.seq:
            newest[rec.key] = rec
        report.superseded += old is not None
    batch: list[IndexEntry] = []
    for key, rec in newest.items():
        loc = rec.loc
        created = rec.seq / 1e9 if rec.seq else 0.0  # v2 sequence numbers are write times in ns
        batch.append(IndexEntry(key, loc.device, loc.offset, loc.length, loc.nbytes, rec.dtype, rec.shape,
                                loc.checksum, created, created, 0))
        if len(batch) >= _BATCH:
            index.put_many(batch)
            batch = []
    index.put_many(batch)
    report.recovered = len(newest)
    report.seconds = time.perf_counter() - start
    log.warning("rebuilt the index from %d verified records: %d keys recovered, %d superseded, %d with only a "
                "key digest (not recoverable)", report.records, report.recovered, report.superseded, report.digest_only)
    return report

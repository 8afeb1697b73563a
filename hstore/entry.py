"""What the catalog keeps per key: an `Entry`, and how it becomes an index record.

An entry's `copies` list holds one slot per rung of the tier ladder; `best` is the first
rung with a copy (where a read is served from). `pending` says which writes the flusher
still owes the value; a memory-only entry is one the durable tier will never hold.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hstore.index import IndexEntry
from hstore.tiers.base import Location

NEEDS_DURABLE = 1
NEEDS_REMOTE = 2


@dataclass(eq=False, slots=True)
class Entry:
    """The catalog's view of one key: its metadata and the copy each tier holds."""

    key: bytes
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    seq: int
    cost: float | None
    copies: list  # Location | None per rung
    best: int = -1  # rung a read is served from; -1: no local copy
    pending: int = 0  # NEEDS_DURABLE | NEEDS_REMOTE: writes the flusher still owes this value
    memory_only: bool = False  # the durable tier declined it (admission, size): it is never made durable
    flushing: Location | None = None  # the DRAM copy the flusher is writing (pinned until it ends)
    ready: object = None  # CUDA event of a pending device-to-host copy into the landing slot
    created: float = 0.0
    atime: float = 0.0
    hits: int = 0
    saved_hits: int = 0  # hits the index has; access statistics are persisted at close when they differ


def index_entry(e: Entry, loc: Location) -> IndexEntry:
    """The index record of entry `e` whose durable record is at `loc`."""
    return IndexEntry(e.key, loc.device, loc.offset, loc.length, loc.nbytes, e.dtype, e.shape,
                      loc.checksum, e.created, e.atime, e.hits)

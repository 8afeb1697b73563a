"""The three tier interfaces the store calls, and the values they exchange.

A tier stores payload bytes and hands back a `Location`; it knows nothing of policies or the
other tiers. The store walks an ordered ladder of tiers (`hstore.ladder`); every local tier
says its capacity, use and footprint (`LocalTier`), and each kind has the small interface
that ladder really uses:

* `ArenaTier` (GPU memory, pinned host DRAM): one preallocated arena carved into slots. The
  store copies straight into and out of slots (`allocate` / `view`), so puts and reads cost
  one copy, and the NVMe tier writes a DRAM slot to disk without staging.
* `DurableTier` (NVMe): self-describing records that survive a restart; every record it
  writes is indexed in LMDB by the store, and every read is checked against the record.
* `RemoteTier` (Redis, ...): shared with other stores, so the local catalog does not own its
  contents and never indexes them; every outcome is per key and failures are misses.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass(frozen=True, slots=True, eq=False)
class Location:
    """Where a tier keeps one payload. Only the tier that made it interprets it.

    Compared and hashed by identity: each allocation makes one Location, and the store's
    pins and pending frees are keyed by that object (C-speed hashing on the read path).
    """

    tier: str
    device: int
    offset: int
    length: int  # bytes reserved on the tier (payload + header + padding)
    nbytes: int  # payload bytes
    checksum: int = 0  # payload checksum, for tiers that verify reads


@dataclass(frozen=True, slots=True)
class WriteItem:
    """One payload to write: its key and meta (for self-describing records) and its bytes."""

    key: bytes
    payload: torch.Tensor  # contiguous uint8, any device the tier accepts
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DurableRead:
    """One record to read into `out`, and what it must turn out to be (else it is not used)."""

    key: bytes
    dtype: torch.dtype
    shape: tuple[int, ...]
    loc: Location
    out: torch.Tensor  # contiguous, loc.nbytes long, any device


class ReadStatus(enum.IntEnum):
    OK = 0
    CORRUPT = 1  # checksum, header, key, dtype or shape mismatch: the data must not be used
    IO_ERROR = 2  # the device failed the read (or it came back short)


@dataclass(frozen=True, slots=True)
class ScannedRecord:
    """A record found by scanning a durable tier's files (index recovery)."""

    loc: Location
    key: bytes | None  # None: the header holds only a digest of the key (format 1, or a very long key)
    dtype: torch.dtype
    shape: tuple[int, ...]
    seq: int  # write order; 0 for format 1 records
    version: int


class LocalTier(ABC):
    """What every local tier tells the ladder: its name, capacity, use and the bytes an item takes."""

    name: str = "local"

    @property
    @abstractmethod
    def capacity(self) -> int: ...

    @property
    @abstractmethod
    def used(self) -> int: ...

    @abstractmethod
    def footprint(self, nbytes: int) -> int:
        """Bytes a payload of `nbytes` occupies on this tier (headers, alignment)."""

    def close(self) -> None:
        """Release memory, files and threads. Idempotent."""


class ArenaTier(LocalTier):
    """Capacity-bounded memory carved into slots (GPU pool, pinned DRAM). Thread-safe."""

    name: str = "arena"
    device: torch.device
    pinned: bool = False

    @abstractmethod
    def allocate(self, nbytes: int) -> Location | None:
        """A slot for `nbytes`; None when no free extent fits now (evict and retry)."""

    @abstractmethod
    def view(self, loc: Location) -> torch.Tensor:
        """The slot's payload bytes as a flat uint8 tensor (no copy)."""

    @abstractmethod
    def view_range(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the arena: several adjacent slots at once."""

    @abstractmethod
    def free(self, loc: Location) -> None:
        """Give a slot back. The caller guarantees no reader still uses it."""

    def host_address(self, offset: int) -> int | None:
        """Address of byte `offset` of a host-memory arena, for copies without tensor views; None on a device."""
        return None


class DurableTier(LocalTier):
    """Records that survive a restart. The store indexes what `write_many` returns. Thread-safe."""

    name: str = "durable"

    @property
    @abstractmethod
    def max_item_bytes(self) -> int:
        """The largest payload that can ever be written (larger items stay memory-only)."""

    @abstractmethod
    def write_many(self, items: Sequence[WriteItem]) -> list[Location]:
        """Store every item, all or nothing, durable when this returns.

        Raises TierFullError when there is not room for all of them (nothing is written),
        StoreIOError when the device fails (nothing is kept).
        """

    @abstractmethod
    def read_many(self, reads: Sequence[DurableRead]) -> list[ReadStatus]:
        """Read each record into its `out`, checked against its header, key, dtype, shape and checksum.

        Never raises for a bad item: its status says what went wrong, and its `out` is then
        unspecified.
        """

    @abstractmethod
    def reserve(self, loc: Location) -> bool:
        """Mark an indexed record's space used when reopening; False if it cannot be (out of range, overlap)."""

    @abstractmethod
    def free(self, loc: Location) -> None:
        """Give a record's space back. The caller guarantees no reader still uses it."""

    @abstractmethod
    def scan(self) -> Iterator[ScannedRecord]:
        """Every record whose header and payload checksum verify, in file order (for rebuilding an index)."""


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """A value read from a remote tier, already checked (checksum, key, dtype, shape)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    payload: torch.Tensor  # contiguous uint8 CPU tensor of the value's bytes


class RemoteTier(ABC):
    """A tier shared with other stores (processes, machines).

    The local catalog does not own its contents: keys appear (another node put them) and
    vanish (the server evicted them) at any time, so it is never indexed in LMDB and every
    read outcome is per key; failures are misses, never errors. The store calls it from the
    flusher (writes) and from readers (reads), possibly at once: implementations are
    thread-safe. Writers of one key write identical bytes when keys are content hashes.
    """

    name: str = "remote"

    @abstractmethod
    def write_many(self, items: Sequence[WriteItem]) -> list[bool]:
        """Best effort; False for an item dropped (unreachable, out of memory), which the tier counts."""

    @abstractmethod
    def read_many(self, keys: Sequence[bytes]) -> list[RemoteRecord | None]:
        """Verified records, or None (missing, corrupt, unreachable) per key."""

    @abstractmethod
    def contains_many(self, keys: Sequence[bytes]) -> list[bool]: ...

    @abstractmethod
    def delete_many(self, keys: Sequence[bytes]) -> None:
        """Remove the keys (best effort: a failure is counted, not raised)."""

    def stats(self) -> dict:
        """Counters: hits, misses, bytes_read, bytes_written, errors, dropped_writes, latency."""
        return {}

    def close(self) -> None:
        """Release connections. Idempotent."""

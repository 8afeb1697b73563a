"""The one interface every tier implements (navy's engine interface, in small).

A tier stores opaque byte payloads and hands back a `Location`; it knows
nothing about keys' meaning, policies or the other tiers. `TieredStore`
composes tiers. Nothing here assumes a local file, so a remote tier (e.g.
Redis, for state shared across serving nodes) fits the same shape.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True, slots=True)
class Location:
    """Where a tier keeps one payload. Only the tier that made it interprets it."""

    tier: str
    device: int
    offset: int
    length: int  # bytes reserved on the tier (payload + header + padding)
    nbytes: int  # payload bytes
    checksum: int = 0  # payload checksum, for tiers that verify reads

    def __hash__(self) -> int:  # on the read path for every chunk: hash what tells two places apart
        return hash((self.tier, self.device, self.offset))


@dataclass(frozen=True, slots=True)
class WriteItem:
    """One payload to write: its key (for self-describing records) and its bytes."""

    key: bytes
    payload: torch.Tensor  # contiguous uint8, any device the tier accepts
    dtype: torch.dtype
    shape: tuple[int, ...]


class ReadStatus(enum.IntEnum):
    OK = 0
    CORRUPT = 1  # checksum, header or key mismatch: the data must not be used
    IO_ERROR = 2  # the device failed the read (or it came back short)


class Tier(ABC):
    """Capacity-bounded storage for payloads. Implementations are thread-safe."""

    name: str = "abstract"
    persistent: bool = False

    @property
    @abstractmethod
    def capacity(self) -> int: ...

    @property
    @abstractmethod
    def used(self) -> int: ...

    def footprint(self, nbytes: int) -> int:
        """Bytes a payload of `nbytes` occupies on this tier (headers, alignment)."""
        return nbytes

    @abstractmethod
    def write_many(self, items: Sequence[WriteItem]) -> list[Location]:
        """Store every item, all or nothing.

        Raises TierFullError when there is not room for all of them (nothing is
        written), StoreIOError when the device fails (nothing is kept).
        Persistent tiers return only after the data is durable.
        """

    @abstractmethod
    def read_many(self, keys: Sequence[bytes], locs: Sequence[Location], outs: Sequence[torch.Tensor]) -> list[ReadStatus]:
        """Copy each payload into the matching contiguous `outs` tensor (nbytes long, any device).

        Never raises for a bad item: its status says what went wrong and the
        content of its `out` is then unspecified.
        """

    @abstractmethod
    def free(self, loc: Location) -> None:
        """Give the space of `loc` back. The caller guarantees no reader still uses it."""

    def close(self) -> None:
        """Release memory, files, connections. Idempotent."""


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """One value read back from a remote tier, already checked against its key, dtype, shape and checksum."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    payload: torch.Tensor  # contiguous uint8 on the CPU, checksum-verified (may be a read-only view)


class RemoteTier(ABC):
    """A tier shared with other stores (processes, machines).

    The local catalog does not own its contents: keys appear (another node put
    them) and vanish (the server evicted them) at any time, so it is never
    indexed in LMDB and every read outcome is per key. Failures are misses,
    never errors: a write that does not land returns False and is counted.
    """

    name: str = "remote"

    @abstractmethod
    def write_many(self, items: Sequence[WriteItem]) -> list[bool]:
        """Best effort: True where the item is on the remote, False where it was dropped (counted by reason)."""

    @abstractmethod
    def read_many(self, keys: Sequence[bytes]) -> list[RemoteRecord | None]:
        """A verified record per key, or None (missing, corrupt, unreachable)."""

    @abstractmethod
    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is there now (a later read may still miss: the server evicts at any time)."""

    @abstractmethod
    def delete_many(self, keys: Sequence[bytes]) -> None:
        """Remove the keys, best effort."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters: hits, misses, bytes read and written, errors by kind, latency."""

    def close(self) -> None:
        """Release connections. Idempotent."""

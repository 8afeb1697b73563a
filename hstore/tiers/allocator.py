"""Extent allocator: the space manager of one tier's arena or file.

A tier stores large tensor chunks (typically 64 KiB to 8 MiB) in one arena of
host memory or one file on NVMe and needs to know which byte ranges are free.
Like CacheLib's navy, space is handed out in whole extents rounded up to a
block `unit` (so O_DIRECT transfers stay aligned), never in tiny pieces.

Policy: best fit by size, lowest offset among equals, carved from the front of
the chosen free extent. From a fresh allocator this makes consecutive
allocations adjacent, which lets the restore path coalesce their copies into
one large transfer. Freed extents merge with free neighbours at once, so the
free map always holds maximal free runs.

Data structures (all sorted plain lists searched with `bisect`, so the free
set may hold ~1e5 extents):

- ``_by_size``: sorted ``(size, offset)`` of free extents, for best fit;
- ``_free_starts``: sorted offsets of free extents, for finding the free
  neighbour before an offset and the free extent that contains one;
- ``_free``: offset -> size of free extents;
- ``_used``: offset -> size of extents in use.
"""
from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right, insort
from typing import Iterator

from hstore.buffers import ALIGN, align_up

__all__ = ["ExtentAllocator"]


class ExtentAllocator:
    """Best-fit allocator of `unit`-aligned extents in ``[0, capacity)``.

    Sizes are rounded up to a multiple of `unit`; `capacity` is rounded down
    to one. Offsets are byte offsets into the tier's arena or file.

    Not internally locked: the owning tier serialises calls under its own
    lock (it must update its index in the same critical section anyway).
    """

    def __init__(self, capacity: int, unit: int = ALIGN) -> None:
        capacity, unit = operator.index(capacity), operator.index(unit)
        if unit <= 0:
            raise ValueError(f"unit must be > 0, got {unit}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self._unit = unit
        self._capacity = capacity // unit * unit
        self._by_size: list[tuple[int, int]] = []
        self._free_starts: list[int] = []
        self._free: dict[int, int] = {}
        self._used: dict[int, int] = {}
        self._used_bytes = 0
        if self._capacity:
            self._add_free(0, self._capacity)

    # -- free-map bookkeeping -------------------------------------------------

    def _add_free(self, offset: int, size: int) -> None:
        insort(self._by_size, (size, offset))
        insort(self._free_starts, offset)
        self._free[offset] = size

    def _remove_free(self, offset: int) -> int:
        size = self._free.pop(offset)
        del self._by_size[bisect_left(self._by_size, (size, offset))]
        del self._free_starts[bisect_left(self._free_starts, offset)]
        return size

    def _free_before(self, offset: int) -> int | None:
        """Start of the free extent with the greatest start <= `offset`, if any."""
        i = bisect_right(self._free_starts, offset)
        return self._free_starts[i - 1] if i else None

    def _rounded(self, nbytes: int) -> int:
        nbytes = operator.index(nbytes)
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        return align_up(nbytes, self._unit)

    def _mark_used(self, offset: int, size: int) -> None:
        self._used[offset] = size
        self._used_bytes += size

    # -- public API -----------------------------------------------------------

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new extent of ``align_up(nbytes, unit)`` bytes, or None.

        None means no single free extent is large enough (the caller may evict
        and retry); free space may still exist in smaller fragments.
        """
        size = self._rounded(nbytes)
        i = bisect_left(self._by_size, (size, -1))
        if i == len(self._by_size):
            return None
        free_size, offset = self._by_size[i]
        self._remove_free(offset)
        if free_size > size:
            self._add_free(offset + size, free_size - size)
        self._mark_used(offset, size)
        return offset

    def free(self, offset: int) -> None:
        """Release the extent that starts at `offset` and merge it with free neighbours.

        Raises KeyError if no extent in use starts there (double free, or an
        offset never handed out).
        """
        try:
            size = self._used.pop(offset)
        except KeyError:
            raise KeyError(f"no allocated extent at offset {offset}") from None
        self._used_bytes -= size
        end = offset + size
        if end in self._free:
            size += self._remove_free(end)
        prev = self._free_before(offset)
        if prev is not None and prev + self._free[prev] == offset:
            size += self._remove_free(prev)
            offset = prev
        self._add_free(offset, size)

    def reserve(self, offset: int, nbytes: int) -> None:
        """Mark ``[offset, offset + align_up(nbytes, unit))`` as used.

        For rebuilding the free map from a persisted index on reopen; the
        extent is then freed with ``free(offset)`` like any other. Raises
        ValueError if `offset` is not a multiple of `unit`, the range leaves
        ``[0, capacity)``, or it overlaps space already in use.
        """
        offset = operator.index(offset)
        size = self._rounded(nbytes)
        if offset < 0 or offset % self._unit:
            raise ValueError(f"offset must be a non-negative multiple of unit={self._unit}, got {offset}")
        end = offset + size
        if end > self._capacity:
            raise ValueError(f"[{offset}, {end}) leaves capacity {self._capacity}")
        start = self._free_before(offset)
        if start is None or start + self._free[start] < end:
            raise ValueError(f"[{offset}, {end}) overlaps space in use")
        free_end = start + self._remove_free(start)
        if start < offset:
            self._add_free(start, offset - start)
        if end < free_end:
            self._add_free(end, free_end - end)
        self._mark_used(offset, size)

    def size_of(self, offset: int) -> int:
        """Rounded size of the extent in use at `offset` (KeyError if none)."""
        try:
            return self._used[offset]
        except KeyError:
            raise KeyError(f"no allocated extent at offset {offset}") from None

    @property
    def unit(self) -> int:
        return self._unit

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        """Bytes in extents in use (rounded sizes)."""
        return self._used_bytes

    @property
    def free_bytes(self) -> int:
        return self._capacity - self._used_bytes

    @property
    def largest_free(self) -> int:
        """Size of the largest free extent: the largest allocation that can succeed now."""
        return self._by_size[-1][0] if self._by_size else 0

    def __len__(self) -> int:
        """Number of extents in use."""
        return len(self._used)

    def extents(self) -> Iterator[tuple[int, int]]:
        """``(offset, size)`` of every extent in use, by increasing offset.

        A snapshot: safe to free while iterating.
        """
        return iter(sorted(self._used.items()))

    def free_extents(self) -> list[tuple[int, int]]:
        """``(offset, size)`` of every free extent, by increasing offset (always maximal runs)."""
        return sorted(self._free.items())

    def __repr__(self) -> str:
        return (
            f"ExtentAllocator(capacity={self._capacity}, unit={self._unit}, used={self._used_bytes}, "
            f"extents={len(self._used)}, free_extents={len(self._free)})"
        )

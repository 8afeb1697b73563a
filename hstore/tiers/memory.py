"""Memory tiers: one preallocated arena (host DRAM or GPU memory) carved by an ExtentAllocator.

One big allocation made up front (a pool with a capacity) means no allocator
calls on the hot path, memory that is pinned once, and 4 KiB-aligned slots
that the NVMe tier can write from directly with O_DIRECT.
"""
from __future__ import annotations

import threading

import torch

from hstore.buffers import ALIGN, aligned_empty
from hstore.errors import CapacityError, StoreConfigError
from hstore.tiers.allocator import ExtentAllocator
from hstore.tiers.base import ArenaTier, Location


class MemoryTier(ArenaTier):
    """An ArenaTier living in one arena tensor on one device: the store copies straight
    into and out of its slots (and the NVMe tier streams a DRAM slot to disk without staging)."""

    def __init__(self, name: str, capacity: int, device: torch.device | str, *, pin: bool = False):
        self.name = name
        capacity -= capacity % ALIGN
        try:
            self.device = torch.device(device)
            if self.device.type == "meta":
                raise ValueError("meta tensors hold no data")
            if self.device.type == "cpu":
                self._arena = aligned_empty(capacity, pin=pin)
            else:
                self._arena = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        except (RuntimeError, AssertionError, ValueError) as e:  # bad device, no CUDA, out of memory
            raise StoreConfigError(f"cannot allocate the {name} tier ({capacity} bytes on {device!r}): {e}") from e
        self.pinned = bool(pin and self.device.type == "cpu")
        self._base = self._arena.data_ptr() if self.device.type == "cpu" else None
        self._alloc = ExtentAllocator(capacity, unit=ALIGN)
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def used(self) -> int:
        return self._alloc.used

    def footprint(self, nbytes: int) -> int:
        return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)

    def allocate(self, nbytes: int) -> Location | None:
        """Reserve a slot for `nbytes` (None when no free extent fits)."""
        if self.footprint(nbytes) > self.capacity:
            raise CapacityError(f"an item of {nbytes} bytes is larger than the {self.name} tier ({self.capacity} bytes)")
        with self._lock:
            offset = self._alloc.allocate(max(nbytes, 1))
            if offset is None:
                return None
            length = self._alloc.size_of(offset)
        return Location(self.name, 0, offset, length, nbytes)

    def view(self, loc: Location) -> torch.Tensor:
        """The slot's payload bytes, as a uint8 view of the arena (no copy)."""
        return self._arena.narrow(0, loc.offset, loc.nbytes)

    def view_range(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the arena (several adjacent slots at once)."""
        return self._arena.narrow(0, offset, nbytes)

    def host_address(self, offset: int) -> int | None:
        return self._base + offset if self._base is not None else None

    def free(self, loc: Location) -> None:
        with self._lock:
            self._alloc.free(loc.offset)

    def close(self) -> None:
        self._arena = torch.empty(0, dtype=torch.uint8)
        self._base = None


class DramTier(MemoryTier):
    """Host DRAM, page-locked when CUDA is present so copies to the GPU run at full speed."""

    def __init__(self, capacity: int, *, pin: bool = False):
        super().__init__("dram", capacity, "cpu", pin=pin)


class GpuTier(MemoryTier):
    """A pool of GPU memory with a capacity. `device="cpu"` runs its logic without a GPU (tests)."""

    def __init__(self, capacity: int, device: torch.device | str = "cuda"):
        super().__init__("gpu", capacity, device)

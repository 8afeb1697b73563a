"""SlotRing: the buffers successive restores of one model read into, allocated once.

Device slots (each layer's chunks land in one) and, for reads from NVMe, the
pinned host staging the disk's DMA lands in first. Kept across restores and lent
to one `LayerLoader` at a time; reuse is ordered by events, never by waiting for
the whole previous restore.
"""
from __future__ import annotations

import threading

import torch

from hstore.buffers import aligned_empty, cuda_available


class SlotRing:
    """Device buffers (and, for reads from NVMe, pinned host staging) for successive restores of one model:
    allocated once, grown when a restore needs more, and lent to one loader at a time.

    A slot is written by the loader's copy stream and read by compute on
    another, so reuse is ordered by the event of the compute that last read it,
    which the ring keeps across restores. Buffers allocated per restore would be
    freed while that compute may still be queued. Staging is reused the same way,
    after the copy out of it: pinning 640 MiB (a 16K restore's five slots) costs
    tens of milliseconds, which a restore should pay once, not every time.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.buffers: list[torch.Tensor] = []
        self.free_events: list = []
        self.staging: list[torch.Tensor | None] = []
        self.staging_events: list = []  # the copy out of each staging buffer (None: none queued)
        self.allocations = 0  # buffers allocated so far: a restore that made some paid a one-time cost
        self.lent = False
        self._lock = threading.Lock()  # reader threads allocate staging concurrently

    def lend(self, depth: int, nbytes: int) -> bool:
        """Make `depth` slots of at least `nbytes`; False when another loader holds the ring."""
        if self.lent:
            return False
        for i in range(depth):
            if i < len(self.buffers) and self.buffers[i].numel() >= nbytes:
                continue
            if i < len(self.buffers) and self.free_events[i] is not None:
                self.free_events[i].synchronize()  # growing: the old buffer goes once nothing reads it
            buf = _new_buffer(self.device, nbytes)
            self.allocations += 1
            if i < len(self.buffers):
                self.buffers[i], self.free_events[i] = buf, None
            else:
                self.buffers.append(buf)
                self.free_events.append(None)
        while len(self.staging) < len(self.buffers):
            self.staging.append(None)
            self.staging_events.append(None)
        self.lent = True
        return True

    def staging_for(self, slot: int, nbytes: int) -> torch.Tensor:
        """Slot `slot`'s pinned staging of at least `nbytes`, free to overwrite (its last copy out has run)."""
        if self.staging_events[slot] is not None:
            self.staging_events[slot].synchronize()  # never overwrite staging still being copied (vLLM #45704)
            self.staging_events[slot] = None
        buf = self.staging[slot]
        if buf is None or buf.numel() < nbytes:
            buf = aligned_empty(nbytes, pin=cuda_available())
            self.staging[slot] = buf
            with self._lock:
                self.allocations += 1
        return buf

    def give_back(self) -> None:
        self.lent = False


def _new_buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    if device.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    return aligned_empty(nbytes, pin=False)

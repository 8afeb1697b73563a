"""Aligned (and, where CUDA exists, pinned) host buffers.

O_DIRECT needs buffer addresses and lengths aligned to the device's block size,
and fast host-to-device copies need page-locked memory. Both tiers and callers
that read straight into their own buffers (`TieredStore.get_into`) use these.
"""
from __future__ import annotations

import functools

import torch

ALIGN = 4096


def align_up(n: int, align: int = ALIGN) -> int:
    """Round `n` up to a multiple of `align`."""
    return (n + align - 1) // align * align


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    return torch.cuda.is_available()


def aligned_empty(nbytes: int, *, pin: bool | None = None, align: int = ALIGN) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` whose data pointer is a multiple of `align`.

    `pin=None` pins when CUDA is available. Pinned memory from the CUDA host
    allocator is page aligned already; plain memory is over-allocated and sliced.
    """
    if pin is None:
        pin = cuda_available()
    if pin:
        buf = torch.empty(nbytes + align, dtype=torch.uint8, pin_memory=True)
    else:
        buf = torch.empty(nbytes + align, dtype=torch.uint8)
    skip = (-buf.data_ptr()) % align
    return buf[skip : skip + nbytes]


def is_aligned(t: torch.Tensor, align: int = ALIGN) -> bool:
    """True when a CPU tensor's data pointer is aligned for O_DIRECT."""
    return t.device.type == "cpu" and t.data_ptr() % align == 0


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (no copy)."""
    if not t.is_contiguous():
        raise ValueError("as_bytes needs a contiguous tensor")
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    # as_strided, not reshape: a 1-element "contiguous" tensor may keep an odd stride that view() rejects.
    flat = t.as_strided((t.numel(),), (1,))
    return flat if t.dtype == torch.uint8 else flat.view(torch.uint8)

"""Packing many tensors into one aligned byte extent, and back; batching records into I/O ops.

A tier writes a batch of chunks as one large extent (one I/O instead of many)
and reads it back the same way. O_DIRECT needs every transfer to start and end
on a block boundary, so every record is placed at a multiple of `align` and
the extent's length is padded to a multiple of `align`. Records that end up
back to back are moved by one vectored op (`merge_adjacent`), and long
sequences are cut into batches of a bounded size (`cut_by_size`: the NVMe
tier's read slices, the store's put groups). These are pure functions of sizes
and tensors: no files, no store.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from hstore.buffers import ALIGN, aligned_empty, align_up, as_bytes

__all__ = ["Extent", "pack_layout", "pack_chunks", "unpack_chunks", "merge_adjacent", "cut_by_size"]


def _check_align(align: int) -> int:
    align = operator.index(align)
    if align <= 0:
        raise ValueError(f"align must be > 0, got {align}")
    return align


def pack_layout(sizes: Sequence[int], align: int = ALIGN, header_bytes: int = 0) -> tuple[list[int], int]:
    """Place records back to back in one extent; return ``(record_offsets, total_bytes)``.

    Record `i` is `header_bytes` of header followed by ``sizes[i]`` bytes of
    payload. Returned offsets are *record* starts; the payload of record `i`
    starts at ``record_offsets[i] + header_bytes``. `header_bytes` must itself
    be a multiple of `align` (pad your header to a block), so that every
    record start and every payload start is a multiple of `align`.

    Record `i` occupies ``header_bytes + align_up(sizes[i], align)`` bytes and
    the next record starts right after it: the layout is tight, ordered and
    non-overlapping, and `total_bytes` (the sum) is a multiple of `align`. A
    zero-size record with no header takes no space and shares its offset with
    the next record.
    """
    align = _check_align(align)
    header_bytes = operator.index(header_bytes)
    if header_bytes < 0 or header_bytes % align:
        raise ValueError(f"header_bytes must be a non-negative multiple of align={align}, got {header_bytes}")
    offsets: list[int] = []
    total = 0
    for size in sizes:
        size = operator.index(size)
        if size < 0:
            raise ValueError(f"record sizes must be >= 0, got {size}")
        offsets.append(total)
        total += header_bytes + align_up(size, align)
    return offsets, total


@dataclass(frozen=True)
class Extent:
    """Where one tensor lives inside a packed byte buffer, and how to rebuild it.

    `nbytes` is the tensor's exact byte length (``numel * element_size``), not
    the padded slot; the slot runs to the next extent's offset.
    """

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def end(self) -> int:
        """One past the last payload byte (padding not included)."""
        return self.offset + self.nbytes


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its elements are densely laid out, else a dense copy.

    A one-element tensor counts as contiguous whatever its stride (e.g.
    ``x[0:1, 2]`` has stride ``(cols,)``), yet its flat view keeps that stride
    and cannot be reinterpreted as bytes; copying one element is free.
    """
    if t.is_contiguous() and t.numel() != 1:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def pack_chunks(
    tensors: Sequence[torch.Tensor], align: int = ALIGN, *, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[Extent]]:
    """Copy `tensors` into one flat uint8 buffer laid out by :func:`pack_layout`.

    Returns ``(buffer, extents)`` where ``buffer`` has exactly the layout's
    total length (a multiple of `align`) and ``extents[i]`` locates
    ``tensors[i]``. Any dtype, any shape (0-d and empty included) and any
    strides are accepted; non-contiguous tensors are made contiguous on the
    way. Padding bytes are zeroed, so equal inputs give byte-identical buffers
    (checksums over the whole extent are stable).

    Without `out` the buffer comes from :func:`hstore.buffers.aligned_empty`
    (data pointer aligned to `align`, pinned where CUDA exists) ready for an
    O_DIRECT write. With `out` (a contiguous 1-D uint8 tensor at least that
    long, e.g. a pooled staging buffer) the data is packed into its prefix and
    that prefix is returned.
    """
    align = _check_align(align)
    offsets, total = pack_layout([t.nbytes for t in tensors], align)
    if out is None:
        buf = aligned_empty(total, align=align)
    else:
        if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous() or out.numel() < total:
            raise ValueError(f"out must be a contiguous 1-D uint8 tensor of >= {total} bytes")
        buf = out[:total]
    extents: list[Extent] = []
    for t, off, end in zip(tensors, offsets, offsets[1:] + [total]):
        n = t.nbytes
        if n:
            buf[off : off + n].copy_(as_bytes(_dense(t)))
        buf[off + n : end].zero_()
        extents.append(Extent(off, n, t.dtype, tuple(t.shape)))
    return buf, extents


def _typed_view(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`raw` (1-D uint8) reinterpreted as `dtype`, as a view when torch allows it.

    torch can only reinterpret bytes whose storage offset is a multiple of the
    element size; a buffer sliced at an odd place (or packed with a tiny
    `align`) falls back to a copy.
    """
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype)


def unpack_chunks(buffer: torch.Tensor, extents: Sequence[Extent]) -> list[torch.Tensor]:
    """Rebuild the tensors described by `extents` from a packed uint8 `buffer`.

    Results are *views* into `buffer` (zero copy: the restore path reads an
    extent and hands the pieces on), so they change if the buffer is reused;
    clone to keep them. A copy is made only when an extent's position does
    not allow a typed view (see `_typed_view`). Raises ValueError if an
    extent lies outside the buffer or its size disagrees with dtype and shape.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(f"buffer must be a contiguous 1-D uint8 tensor, got {buffer.dtype} {tuple(buffer.shape)}")
    result = []
    for ext in extents:
        if ext.offset < 0 or ext.end > buffer.numel():
            raise ValueError(f"{ext} lies outside a buffer of {buffer.numel()} bytes")
        expected = math.prod(ext.shape) * ext.dtype.itemsize
        if expected != ext.nbytes:
            raise ValueError(f"{ext}: shape and dtype need {expected} bytes")
        result.append(_typed_view(buffer[ext.offset : ext.end], ext.dtype).reshape(ext.shape))
    return result


def merge_adjacent(
    extents: Sequence[tuple[int, int, int]],
    *,
    max_bytes: int,
    parts: Sequence[int] | None = None,
    max_parts: int | None = None,
) -> list[list[int]]:
    """Group ``(device, offset, size)`` extents that lie back to back on one device into runs.

    Returns lists of indices into `extents`: every index exactly once, runs ordered by
    (device, offset) and each run's extents contiguous in that order. A run grows while
    its total stays within `max_bytes` (so several runs can be in flight at once) and,
    when `parts` gives each extent's iovec count, while their sum stays within
    `max_parts` (IOV_MAX). An extent larger than `max_bytes` is a run of its own.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    order = sorted(range(len(extents)), key=lambda i: (extents[i][0], extents[i][1]))
    runs: list[list[int]] = []
    dev = start = end = n_parts = None
    for i in order:
        d, off, size = extents[i]
        p = parts[i] if parts is not None else 0
        if (runs and d == dev and off == end and end + size - start <= max_bytes
                and (max_parts is None or n_parts + p <= max_parts)):
            runs[-1].append(i)
            end += size
            n_parts += p
            continue
        runs.append([i])
        dev, start, end, n_parts = d, off, off + size, p
    return runs


def cut_by_size(sizes: Sequence[int], max_bytes: int) -> list[range]:
    """Consecutive groups of `sizes` whose totals stay within `max_bytes`.

    Ranges of indices covering ``range(len(sizes))`` in order; an item larger than
    `max_bytes` is a group of its own (it is never dropped or split).
    """
    groups: list[range] = []
    begin, total = 0, 0
    for i, size in enumerate(sizes):
        if i > begin and total + size > max_bytes:
            groups.append(range(begin, i))
            begin, total = i, 0
        total += size
    if begin < len(sizes):
        groups.append(range(begin, len(sizes)))
    return groups

"""Where a batched read puts its values: a list of buffers, or the rows of one tensor.

`get_many_into` takes either; the read path sees one interface (check, follows, span,
address) and never asks which it has.
"""
from __future__ import annotations

from typing import Sequence

import torch

from hstore.buffers import as_bytes
from hstore.errors import InvalidItemError


class BufferList:
    """Outputs as a list of tensors, one per key."""

    def __init__(self, outs: Sequence[torch.Tensor]):
        self.outs = list(outs)
        self.cpu = all(isinstance(o, torch.Tensor) and o.device.type == "cpu" for o in self.outs)

    def __len__(self) -> int:
        return len(self.outs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.outs[i]

    def check(self, entries) -> None:
        """Raise InvalidItemError unless every found item fits its buffer (before anything is read)."""
        for e, out in zip(entries, self.outs):
            if e is None:
                continue
            if not isinstance(out, torch.Tensor) or not out.is_contiguous() or out.device.type == "meta":
                raise InvalidItemError("output buffers must be contiguous tensors that hold data (not meta)")
            if out.dtype != e.dtype or out.numel() * out.element_size() != e.nbytes:
                raise InvalidItemError(
                    f"output buffer {out.dtype}{tuple(out.shape)} does not match the item {e.dtype}{e.shape}"
                )

    def fits(self, i: int, dtype: torch.dtype, nbytes: int) -> bool:
        out = self.outs[i]
        return isinstance(out, torch.Tensor) and out.dtype == dtype and out.numel() * out.element_size() == nbytes

    def follows(self, prev: int, i: int, prev_nbytes: int) -> bool:
        """Output i starts right where output `prev` (of `prev_nbytes`) ends, in the same allocation."""
        po, o = self.outs[prev], self.outs[i]
        return (o.device == po.device and o.data_ptr() == po.data_ptr() + prev_nbytes
                and o.untyped_storage().data_ptr() == po.untyped_storage().data_ptr())

    def span(self, i: int, nbytes: int) -> torch.Tensor:
        """`nbytes` of output i's storage as a flat uint8 tensor, starting where output i starts."""
        out = self.outs[i]
        if nbytes == out.numel() * out.element_size():
            return as_bytes(out)
        storage = out.untyped_storage()
        start = out.data_ptr() - storage.data_ptr()
        return torch.empty(0, dtype=torch.uint8, device=out.device).set_(storage, start, (nbytes,), (1,))

    def address(self, i: int) -> int:
        """Host address where output i starts (CPU outputs only)."""
        return self.outs[i].data_ptr()


class StackedRows:
    """One contiguous output tensor whose rows receive one item each."""

    def __init__(self, out: torch.Tensor):
        if out.dim() < 1 or not out.is_contiguous() or out.device.type == "meta":
            raise InvalidItemError("a stacked output must be a contiguous tensor with one row per key (not meta)")
        self.out = out
        self.dtype = out.dtype
        self.row_bytes = (out[0].numel() if out.shape[0] else 0) * out.element_size()
        self.row_shape = tuple(out.shape[1:])
        self.cpu = out.device.type == "cpu"
        self._flat = as_bytes(out)
        self._base = out.data_ptr()

    def __len__(self) -> int:
        return self.out.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.out[i]

    def check(self, entries) -> None:
        dtype, row = self.dtype, self.row_bytes
        for e in entries:
            if e is not None and (e.dtype != dtype or e.nbytes != row):
                raise InvalidItemError(
                    f"output rows {self.dtype}{self.row_shape} do not match the item {e.dtype}{e.shape}")

    def fits(self, i: int, dtype: torch.dtype, nbytes: int) -> bool:
        return dtype == self.dtype and nbytes == self.row_bytes

    def follows(self, prev: int, i: int, prev_nbytes: int) -> bool:
        return i == prev + 1  # rows are back to back, and each holds exactly its item (checked)

    def span(self, i: int, nbytes: int) -> torch.Tensor:
        """`nbytes` of the output as flat bytes, from the start of row i."""
        return self._flat.narrow(0, i * self.row_bytes, nbytes)

    def address(self, i: int) -> int:
        return self._base + i * self.row_bytes


def readouts(outs: Sequence[torch.Tensor] | torch.Tensor) -> BufferList | StackedRows:
    return StackedRows(outs) if isinstance(outs, torch.Tensor) else BufferList(outs)

"""Helpers for the remote tier's tests: tensors to WriteItems and records back to tensors."""
from __future__ import annotations

import torch

from hstore.tiers.base import RemoteRecord, WriteItem
from tests.helpers.store import tensor_bytes


def item(key: bytes, t: torch.Tensor) -> WriteItem:
    """A WriteItem of `t`'s bytes (a fresh contiguous copy, as the store's DRAM copy would be)."""
    payload = torch.frombuffer(bytearray(tensor_bytes(t)), dtype=torch.uint8) if t.numel() else torch.empty(
        0, dtype=torch.uint8)
    return WriteItem(key, payload, t.dtype, tuple(t.shape))


def tensor_of(record: RemoteRecord | None) -> torch.Tensor | None:
    """The tensor a record holds (a copy, so it outlives the record's buffer)."""
    if record is None:
        return None
    return record.payload.clone().view(record.dtype).reshape(record.shape)


def blob(key: bytes, nbytes: int) -> WriteItem:
    """`nbytes` of bytes derived from the key (a chunk-sized value whose content a reader can check)."""
    gen = torch.Generator().manual_seed(int.from_bytes(key[-8:].rjust(8, b"\0"), "little") & (2**62))
    return item(key, torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen))

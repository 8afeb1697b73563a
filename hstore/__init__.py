"""hstore: a tiered tensor store (GPU memory, pinned host DRAM, NVMe through io_uring).

Nothing here knows about language models: keys are bytes or strings, values are
tensors. See `TieredStore` and `StoreConfig`.
"""
from __future__ import annotations

from hstore.errors import (
    CapacityError,
    CorruptChunkError,
    HStoreError,
    InvalidItemError,
    StoreClosedError,
    StoreConfigError,
    StoreIOError,
    StoreLockedError,
    TierFullError,
)

__all__ = [
    "TieredStore",
    "StoreConfig",
    "HStoreError",
    "StoreConfigError",
    "StoreClosedError",
    "StoreLockedError",
    "InvalidItemError",
    "CapacityError",
    "TierFullError",
    "StoreIOError",
    "CorruptChunkError",
]


def __getattr__(name):  # import the heavy parts on first use
    if name == "TieredStore":
        from hstore.store import TieredStore

        return TieredStore
    if name == "StoreConfig":
        from hstore.config import StoreConfig

        return StoreConfig
    raise AttributeError(name)

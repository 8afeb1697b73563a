"""The one exception hierarchy of hstore.

Callers catch `HStoreError` for anything the store raises on purpose; the
subclasses say what went wrong so a caller can react (evict, retry, give up).
"""


class HStoreError(Exception):
    """Base class of every error hstore raises on purpose."""


class StoreConfigError(HStoreError, ValueError):
    """A StoreConfig value is invalid or does not match the store on disk."""


class StoreClosedError(HStoreError):
    """An operation was attempted on a closed store."""


class StoreLockedError(HStoreError):
    """Another process holds the store's root open for writing."""


class InvalidItemError(HStoreError, TypeError, ValueError):
    """A key, value, cost hint or output buffer handed to the store is not something it can use.

    Both a TypeError and a ValueError: bad input of either kind is caught the usual way.
    """


class CapacityError(HStoreError):
    """An item can never fit: it is larger than the tier it must land in."""


class TierFullError(HStoreError):
    """A tier has no room right now; the caller may evict and retry."""


class StoreIOError(HStoreError, OSError):
    """A read or write failed at the device (I/O error, full disk, short transfer)."""

    def __init__(self, message: str, errno_: int = 0):
        super().__init__(errno_, message)
        self.errno = errno_

    def __str__(self) -> str:  # OSError's default repr is "[Errno n] msg"
        return self.args[1] if len(self.args) > 1 else super().__str__()


class DeviceError(HStoreError, RuntimeError):
    """A torch device the store was asked to use cannot be used (no CUDA, a bad index, out of memory)."""


class IndexCorruptError(HStoreError):
    """The LMDB index is damaged or missing while data files exist.

    Nothing was opened; the message names `hstore recover ROOT`, which rebuilds the index
    from the data files' record headers (or open with StoreConfig(recover_index=True)).
    """


class CorruptChunkError(HStoreError):
    """A stored chunk failed its checksum or header check; it is treated as a miss."""

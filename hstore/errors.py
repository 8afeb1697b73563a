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


class InvalidItemError(HStoreError, TypeError):
    """A key or value handed to the store is not something it can hold."""


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


class CorruptChunkError(HStoreError):
    """A stored chunk failed its checksum or header check; it is treated as a miss."""

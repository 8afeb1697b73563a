"""One NVMe data file: created and preallocated to its full size up front, opened O_DIRECT; and
a scan of its records for rebuilding a lost index.

Preallocating (posix_fallocate) at open means a full disk is found when the store
opens, with a clear error, not in the middle of a flush; and a failed reservation
gives back what it took.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from hstore.buffers import ALIGN, align_up
from hstore.errors import StoreConfigError, StoreIOError
from hstore.format import RECORD_MAGICS, data_file
from hstore.record import HEADER_BYTES, RecordHeader, checksum
from hstore.tiers.allocator import ExtentAllocator

log = logging.getLogger(__name__)


class DataFile:
    """One preallocated data file in one directory, opened O_DIRECT where the filesystem allows it."""

    def __init__(self, directory: Path, size: int):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreConfigError(f"cannot use {directory} as an NVMe directory: {e.strerror or e}") from e
        self.path = data_file(directory)
        created = not self.path.exists()
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
            self.direct = True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise StoreIOError(f"cannot open {self.path}: {e.strerror}", e.errno or 0) from e
            # tmpfs and some FUSE filesystems refuse O_DIRECT; correctness holds without it.
            log.warning("%s does not support O_DIRECT; NVMe tier falls back to buffered I/O there", directory)
            self.fd = os.open(self.path, flags, 0o644)
            self.direct = False
        current = os.fstat(self.fd).st_size
        if current > size:
            os.close(self.fd)
            raise StoreConfigError(
                f"{self.path} holds {current} bytes but the config asks for {size} per device; "
                "an NVMe tier cannot shrink (raise nvme_bytes or use a new root)"
            )
        if current < size:
            # Check first: a failed fallocate may have taken every free block before it gave up.
            vfs = os.statvfs(self.fd)
            free = vfs.f_bavail * vfs.f_frsize
            error: StoreIOError | None = None
            if size - current > free:
                error = StoreIOError(
                    f"cannot reserve {size} bytes for the NVMe tier in {directory}: only {free} bytes are free "
                    "(nvme_bytes is split evenly over nvme_dirs; lower it or free space)", errno.ENOSPC
                )
            else:
                try:
                    os.posix_fallocate(self.fd, 0, size)
                except OSError as e:
                    error = StoreIOError(
                        f"cannot reserve {size} bytes for the NVMe tier in {directory}: {e.strerror}", e.errno or 0
                    )
            if error is not None:
                self._give_back(current, created)
                raise error
        self.size = size
        self.alloc = ExtentAllocator(size, unit=ALIGN)

    def _give_back(self, size: int, created: bool) -> None:
        """Undo a failed reservation: back to `size` bytes, or no file at all if this call made it."""
        try:
            if created:
                os.unlink(self.path)
            else:
                os.ftruncate(self.fd, size)
        except OSError as e:
            log.warning("could not release the space reserved in %s: %s", self.path, e)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


SCAN_CHUNK_BYTES = 8 << 20


def scan_records(path: Path) -> Iterator[tuple[int, RecordHeader]]:
    """(offset, header) of every record in a data file whose header and payload checksum verify.

    Reads the file sequentially through the page cache (this is for rebuilding a lost
    index, not the serving path). Headers sit on 4 KiB boundaries; a verified record's
    extent is skipped whole, anything else is stepped over 4 KiB at a time, so torn,
    stale-and-overwritten and foreign blocks are passed by.
    """
    magics = [np.frombuffer(m, dtype=np.uint8) for m in RECORD_MAGICS]
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset + HEADER_BYTES <= size:
            chunk = os.pread(fd, min(SCAN_CHUNK_BYTES, size - offset) // ALIGN * ALIGN, offset)
            if not chunk:
                return
            blocks = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, ALIGN)
            starts = np.zeros(len(blocks), dtype=bool)
            for m in magics:
                starts |= (blocks[:, : len(m)] == m).all(axis=1)
            cursor = offset  # everything before it is inside a verified record already
            for b in np.flatnonzero(starts).tolist():
                at = offset + b * ALIGN
                if at < cursor:
                    continue
                hdr = RecordHeader.unpack(chunk[b * ALIGN : (b + 1) * ALIGN])
                if hdr is None:
                    continue
                end = at + HEADER_BYTES + align_up(hdr.nbytes)
                if end > size:
                    continue
                payload = os.pread(fd, hdr.nbytes, at + HEADER_BYTES) if hdr.nbytes else b""
                if len(payload) != hdr.nbytes or checksum(payload) != hdr.checksum:
                    continue
                yield at, hdr
                cursor = end
            offset = max(offset + len(chunk), cursor)

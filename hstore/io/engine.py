"""The I/O engine interface the NVMe tier talks to.

The tier decides *what* to read and write (files, offsets, buffers); an engine
only moves bytes. Keeping the engine behind this small interface lets the tier
run on io_uring, on a thread pool of preadv/pwritev, or on a fault-injecting
engine in tests, without knowing which.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class IoOp:
    """One positional vectored transfer: `iov` is a tuple of (address, length).

    For O_DIRECT files every address, length and `offset` must be aligned to the
    device block size (hstore always uses 4096). `expected` is the number of bytes
    the caller needs (the sum of the iov lengths).
    """

    write: bool
    fd: int
    offset: int
    iov: tuple[tuple[int, int], ...]

    @property
    def expected(self) -> int:
        return sum(length for _, length in self.iov)


class IoEngine(ABC):
    """Runs batches of IoOps. Implementations must be safe to call from several threads."""

    name: str = "abstract"

    @abstractmethod
    def run(self, ops: Sequence[IoOp]) -> list[int]:
        """Run every op and block until all have finished.

        Returns, per op, the bytes transferred (== op.expected on success; fewer
        on a short transfer that could not be completed, e.g. end of file) or a
        negative errno. Engines retry short transfers and EINTR/EAGAIN
        themselves; they never raise for a per-op failure.
        """

    def fsync(self, fd: int) -> int:
        """Make completed writes to `fd` durable; 0 or a negative errno."""
        import os

        try:
            os.fdatasync(fd)
            return 0
        except OSError as e:
            return -(e.errno or 5)
        except ValueError:  # a negative fd
            return -9  # EBADF

    def close(self) -> None:
        """Release rings, threads, registered buffers. Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

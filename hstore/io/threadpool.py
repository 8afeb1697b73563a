"""The portable engine: a thread pool of os.preadv / os.pwritev.

Why it exists: io_uring is missing or blocked in many containers, and the NVMe
tier must still work (and its tests must still run) there. The semantics match
`UringEngine` op for op: short transfers are continued until end of file,
EINTR/EAGAIN are retried, and per-op failures come back as negative errnos.
The syscalls release the GIL, so `workers` ops really are in flight at once.
"""
from __future__ import annotations

import ctypes
import errno
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from hstore.errors import StoreClosedError, StoreConfigError
from hstore.io.engine import IoEngine, IoOp

MAX_RETRIES = 1000  # consecutive EINTR/EAGAIN without progress before giving up
_FD_MAX = 2**31 - 1


def iov_views(iov: tuple[tuple[int, int], ...]) -> list[memoryview]:
    """Writable views of raw (address, length) ranges; zero lengths dropped."""
    return [memoryview((ctypes.c_char * length).from_address(addr)) for addr, length in iov if length]


def advance_views(views: list[memoryview], n: int) -> list[memoryview]:
    """The views left after the first `n` bytes were transferred."""
    i = 0
    while i < len(views) and len(views[i]) <= n:
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def transfer(op: IoOp) -> int:
    """Run one op synchronously: bytes transferred (short only at end of file),
    or a negative errno. Never raises for an I/O failure."""
    if not 0 <= op.fd <= _FD_MAX:
        return -errno.EBADF
    try:
        views = iov_views(op.iov)
    except (ValueError, OverflowError, TypeError):  # negative or absurd length
        return -errno.EINVAL
    call = os.pwritev if op.write else os.preadv
    done = 0
    retries = 0
    while views:
        try:
            n = call(op.fd, views, op.offset + done)
        except (InterruptedError, BlockingIOError) as e:
            retries += 1
            if retries >= MAX_RETRIES:
                return -e.errno
            continue
        except OSError as e:
            return -(e.errno or errno.EIO)
        if n == 0:  # end of file: report the short count
            break
        retries = 0
        done += n
        views = advance_views(views, n)
    return done


class ThreadPoolEngine(IoEngine):
    """Runs a batch's ops on `workers` threads; a single op runs on the caller's
    thread (no hand-off latency for the common one-chunk read)."""

    name = "threads"

    def __init__(self, workers: int = 8):
        if workers < 1:
            raise StoreConfigError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hstore-io")
        self._closed = False

    def run(self, ops: Sequence[IoOp]) -> list[int]:
        if self._closed:
            raise StoreClosedError("thread-pool engine is closed")
        if len(ops) <= 1:
            return [transfer(op) for op in ops]
        try:
            return list(self._pool.map(transfer, ops))
        except RuntimeError as e:  # pool shut down by a concurrent close()
            raise StoreClosedError("thread-pool engine is closed") from e

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)

"""The io_uring engine: one C call per batch, one ring per thread.

Why per-thread rings: a ring is not safe to share without a lock around both
submission and completion, and the NVMe tier's flusher thread and its reader
threads must not wait on each other. Each thread lazily gets its own ring on
first use; the engine keeps (weak) track of them all so `close()` can free
them, and a ring whose thread dies is freed with it.

Why flat int64 arrays: the binding (`hstore.io._uring`, built from
`_uring_build.py`) takes a batch as `struct hs_op[]` plus `struct iovec[]`, both
made only of 64-bit words, so Python packs a batch into two `array('q')` and
hands cffi their buffers; no cffi object per op, and the GIL is released for the
whole batch.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import tempfile
import threading
import weakref
from array import array
from itertools import chain
from typing import Sequence

from hstore.errors import StoreClosedError, StoreConfigError, StoreIOError
from hstore.io.engine import IoEngine, IoOp

try:
    from hstore.io._uring import ffi, lib
except ImportError as e:  # not built: no liburing headers, or HSTORE_NO_URING=1
    ffi = lib = None
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

log = logging.getLogger(__name__)

MAX_QUEUE_DEPTH = 4096
_FIELDS = 6  # int64 words per struct hs_op: fd, write, offset, iov_first, nr_iov, result
_RESULT = 5
_PROBE_BYTES = 4096

# Bumped in a forked child: rings inherited from the parent must never be used there.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Ring:
    """One thread's io_uring. The lock only ever contends with `close()`, so an
    engine closed from another thread waits for a running batch instead of
    freeing the ring under it."""

    __slots__ = ("_ptr", "_lock", "generation", "__weakref__")

    def __init__(self, depth: int):
        out = ffi.new("struct hs_ring **")
        rc = lib.hs_ring_open(out, depth)
        if rc < 0:
            raise OSError(-rc, f"io_uring_queue_init({depth}): {os.strerror(-rc)}")
        self._ptr = out[0]
        self._lock = threading.Lock()
        self.generation = _fork_generation

    def run(self, ops_c, n: int, iovs_c, niov: int) -> int:
        with self._lock:
            if self._ptr is None:
                raise StoreClosedError("io_uring engine is closed")
            return lib.hs_run(self._ptr, ops_c, n, iovs_c, niov)

    def close(self) -> None:
        with self._lock:
            if self._ptr is not None:
                lib.hs_ring_close(self._ptr)
                self._ptr = None

    def __del__(self) -> None:
        if getattr(self, "_ptr", None) is not None and lib is not None:
            lib.hs_ring_close(self._ptr)
            self._ptr = None


def pack_batch(ops: Sequence[IoOp]) -> tuple[array, array]:
    """The batch as the binding's two flat int64 arrays: ops (six words each,
    result zeroed) and iovecs ((address, length) pairs)."""
    packed = array("q")
    iovs = array("q")
    first = 0
    for op in ops:
        packed.extend((op.fd, op.write, op.offset, first, len(op.iov), 0))
        first += len(op.iov)
    iovs.extend(chain.from_iterable(chain.from_iterable(op.iov for op in ops)))
    return packed, iovs


def _run_batch(ring: _Ring, ops: Sequence[IoOp]) -> list[int]:
    """Per-op results of one batch on `ring`; OSError if the ring itself failed."""
    packed, iovs = pack_batch(ops)
    ops_c = ffi.from_buffer("struct hs_op[]", packed)
    iovs_c = ffi.from_buffer("struct iovec[]", iovs) if iovs else ffi.NULL
    rc = ring.run(ops_c, len(ops), iovs_c, len(iovs) // 2)
    if rc < 0:
        raise OSError(-rc, f"io_uring ring failed: {os.strerror(-rc)}")
    return packed[_RESULT::_FIELDS].tolist()


def _probe_readv_writev(ring: _Ring) -> str | None:
    """Write a block through the ring and read it back. Some sandboxes (gVisor)
    create rings but support only a few opcodes; better to know it here than
    to have every store write fail with -EINVAL."""
    try:
        scratch = tempfile.TemporaryFile()
    except OSError:
        return None  # nowhere to probe: trust the ring
    with scratch:
        src = ctypes.create_string_buffer(bytes(range(256)) * (_PROBE_BYTES // 256), _PROBE_BYTES)
        dst = ctypes.create_string_buffer(_PROBE_BYTES)
        fd = scratch.fileno()
        wrote = _run_batch(ring, [IoOp(True, fd, 0, ((ctypes.addressof(src), _PROBE_BYTES),))])
        read = _run_batch(ring, [IoOp(False, fd, 0, ((ctypes.addressof(dst), _PROBE_BYTES),))])
    if wrote != [_PROBE_BYTES] or read != [_PROBE_BYTES] or dst.raw != src.raw:
        return f"io_uring readv/writev do not work here (write gave {wrote}, read gave {read})"
    return None


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why io_uring cannot be used here, or None when it can.

    Importing the binding is not enough: containers often block io_uring_setup
    (seccomp, or sysctl kernel.io_uring_disabled), and sandboxes may accept a
    ring yet not run readv/writev, so a ring is created and probed.
    """
    if _IMPORT_ERROR is not None:
        return (
            f"the io_uring binding hstore.io._uring is not built ({_IMPORT_ERROR}); install "
            "liburing-dev and rebuild (pip install --no-build-isolation -e ., or "
            "python setup.py build_ext --inplace)"
        )
    try:
        ring = _Ring(1)
    except OSError as e:
        return (
            f"cannot create an io_uring ring ({e}); io_uring may be disabled by seccomp "
            "or sysctl kernel.io_uring_disabled"
        )
    try:
        return _probe_readv_writev(ring)
    except OSError as e:
        return f"io_uring readv/writev probe failed: {e}"
    finally:
        ring.close()


class UringEngine(IoEngine):
    """Runs each batch through this thread's io_uring with up to `queue_depth`
    ops in flight. Short transfers and EINTR/EAGAIN are retried in C; per-op
    errors come back as negative errnos; only a failure of the ring itself
    raises `StoreIOError`."""

    name = "uring"

    def __init__(self, queue_depth: int = 64):
        if not 1 <= queue_depth <= MAX_QUEUE_DEPTH:
            raise StoreConfigError(f"queue_depth must be in 1..{MAX_QUEUE_DEPTH}, got {queue_depth}")
        reason = unavailable_reason()
        if reason is not None:
            raise StoreConfigError(f"io_uring is unavailable: {reason}")
        self.queue_depth = queue_depth
        self._local = threading.local()
        self._rings: weakref.WeakSet[_Ring] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def is_available(cls) -> bool:
        """The binding is built and this process may create (and use) a ring."""
        return unavailable_reason() is None

    def _ring(self) -> _Ring:
        ring = getattr(self._local, "ring", None)
        if ring is not None and ring.generation == _fork_generation:
            return ring
        with self._lock:
            if self._closed:
                raise StoreClosedError("io_uring engine is closed")
            try:
                ring = _Ring(self.queue_depth)
            except OSError as e:
                raise StoreIOError(f"cannot create an io_uring ring: {e}", e.errno or 0) from e
            self._rings.add(ring)
        self._local.ring = ring
        return ring

    def run(self, ops: Sequence[IoOp]) -> list[int]:
        if not ops:
            return []
        ring = self._ring()
        try:
            return _run_batch(ring, ops)
        except OSError as e:
            # The C side has waited for everything the kernel held; the ring may
            # still hold unsubmitted entries, so it is never used again.
            self._local.ring = None
            ring.close()
            log.error("dropping this thread's io_uring ring: %s", e)
            raise StoreIOError(str(e), e.errno or 0) from e

    def close(self) -> None:
        with self._lock:
            self._closed = True
            rings = list(self._rings)
            self._rings.clear()
        for ring in rings:
            ring.close()

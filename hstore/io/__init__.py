"""I/O engines: how the NVMe tier moves bytes between files and host buffers.

The tier builds `IoOp`s and hands batches to an `IoEngine`; `make_engine`
picks io_uring where the kernel allows it and falls back to a thread pool of
preadv/pwritev elsewhere, so the same store runs in a locked-down container
and on a tuned host.
"""
from __future__ import annotations

import logging

from hstore.errors import StoreConfigError
from hstore.io.engine import IoEngine, IoOp
from hstore.io.faulty import Fault, FaultRule, FaultyEngine
from hstore.io.threadpool import ThreadPoolEngine
from hstore.io.uring import UringEngine, unavailable_reason

__all__ = [
    "IoOp",
    "IoEngine",
    "UringEngine",
    "ThreadPoolEngine",
    "FaultyEngine",
    "FaultRule",
    "Fault",
    "ENGINE_KINDS",
    "make_engine",
    "uring_available",
    "uring_unavailable_reason",
]

log = logging.getLogger(__name__)

ENGINE_KINDS = ("auto", "uring", "threads")
_fallback_logged = False


def uring_available() -> bool:
    """True when the io_uring binding is built and a ring can be created here."""
    return unavailable_reason() is None


def uring_unavailable_reason() -> str | None:
    """Why io_uring cannot be used here, or None when it can."""
    return unavailable_reason()


def make_engine(kind: str = "auto", queue_depth: int = 64, workers: int = 8) -> IoEngine:
    """An engine of `kind`: "uring", "threads", or "auto" (io_uring if available,
    else the thread pool, saying so once in the log). Raises StoreConfigError for
    an unknown kind or for "uring" where io_uring cannot run."""
    global _fallback_logged
    if kind not in ENGINE_KINDS:
        raise StoreConfigError(f"io engine must be one of {ENGINE_KINDS}, got {kind!r}")
    if kind != "threads":
        reason = unavailable_reason()
        if reason is None:
            return UringEngine(queue_depth)
        if kind == "uring":
            raise StoreConfigError(f"io engine 'uring' requested but io_uring is unavailable: {reason}")
        if not _fallback_logged:
            _fallback_logged = True
            log.warning("io_uring unavailable, using the thread-pool engine (%d workers): %s", workers, reason)
    return ThreadPoolEngine(workers)

"""The second stage of two-stage saving: a thread that moves dirty DRAM items to NVMe.

`put()` only copies into DRAM; this thread gathers dirty items in put order
into large batches, writes each batch as packed vectored writes, makes it
durable, and only then indexes it. On a device error the batch stays dirty and
is retried with backoff, while `flush()` callers are told.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from hstore.errors import HStoreError

if TYPE_CHECKING:
    from hstore.store import TieredStore

log = logging.getLogger(__name__)


class Flusher:
    def __init__(self, store: "TieredStore"):
        self._store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hstore-flusher", daemon=True)
        self._backoff = 0.0

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the thread has ended (closed, or crashed on a bug): nothing will be flushed any more."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Drain what is dirty (the store is closing), then end the thread."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        store = self._store
        batch_bytes = min(store.config.flush_batch_bytes, max(store.nvme.capacity // 4, 4096))
        while True:
            batch = store._take_dirty_batch(batch_bytes)
            if not batch:
                if self._stop.is_set():
                    return
                continue
            try:
                locs = store._write_batch(batch)
                store._publish(batch, locs)
                self._backoff = 0.0
            except (HStoreError, OSError) as e:
                store._abort_flush(batch, e)
                if self._stop.is_set():
                    log.error("dropping %d unflushed item(s) at close: %s", len(batch), e)
                    return
                self._backoff = min(max(self._backoff * 2, 0.05), 2.0)
                log.warning("flush of %d item(s) failed (%s); retrying in %.2fs", len(batch), e, self._backoff)
                self._stop.wait(self._backoff)
            except BaseException:
                log.exception("flusher crashed")
                store._abort_flush(batch, RuntimeError("flusher crashed"))
                raise

"""The second stage of two-stage saving: a thread that moves dirty values to the durable and remote tiers.

`put()` only copies into DRAM; this thread takes dirty entries in put order as large
batches from a `FlushSource` (the catalog), writes each batch as packed vectored writes to
the durable tier (making room by evicting its least valuable records when it is full),
sends it to the remote tier (best effort: a dropped write is counted, never retried nor
raised), and only then commits it (the index learns the durable records). On a device
error the batch stays dirty and is retried with backoff, while `flush()` callers are told.

It is built from its collaborators and never calls the store: the source of batches, the
durable tier, the remote tier, a `make_room(bytes)` callback and the gate through which
latency-critical callers hold it back between batches (`foreground.py`).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol, Sequence

from hstore.errors import HStoreError, TierFullError
from hstore.foreground import BackgroundGate
from hstore.tiers.base import DurableTier, Location, RemoteTier

log = logging.getLogger(__name__)


class FlushSource(Protocol):
    """Where batches come from and where their outcome goes (the catalog implements it)."""

    closed: bool

    def next_batch(self, max_bytes: int):
        """A batch (with .items, .durable, .remote, .events) or None after a short wait."""

    def commit(self, batch, locs: Sequence[Location | None], remote: Sequence[bool | None]) -> None:
        """The batch is written: index its durable records (`locs`), count the remote
        outcome (`remote`: written, dropped, or not sent), mark it clean."""

    def abort(self, batch, error: BaseException) -> None:
        """The batch failed: it stays dirty."""

    def finish(self, batch) -> None:
        """Release the batch (after commit or abort)."""


class Flusher:
    def __init__(self, source: FlushSource, *, durable: DurableTier | None, remote: RemoteTier | None,
                 make_room: Callable[[int], int], batch_bytes: int, gate: BackgroundGate | None = None):
        """`gate`: asked before each batch, so that callers can hold background work back (foreground.py)."""
        self.source = source
        self.gate = gate
        self.durable = durable
        self.remote = remote
        self.make_room = make_room
        cap = durable.capacity // 4 if durable is not None else batch_bytes
        self.batch_bytes = min(batch_bytes, max(cap, 4096))
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
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            batch = self.source.next_batch(self.batch_bytes)
            if batch is None:
                if self._stop.is_set():
                    return
                continue
            if self.gate is not None:
                self.gate.wait_clear(self._stop)  # a caller's latency-critical work first (bounded)
            try:
                self.flush_batch(batch)
            except (HStoreError, OSError) as e:
                self.source.abort(batch, e)
                self.source.finish(batch)
                if self._stop.is_set():
                    log.error("dropping %d unflushed item(s) at close: %s", len(batch.items), e)
                    return
                self._backoff = min(max(self._backoff * 2, 0.05), 2.0)
                log.warning("flush of %d item(s) failed (%s); retrying in %.2fs", len(batch.items), e, self._backoff)
                self._stop.wait(self._backoff)
            except BaseException:
                log.exception("flusher crashed")
                self.source.abort(batch, RuntimeError("flusher crashed"))
                self.source.finish(batch)
                raise
            else:
                self.source.finish(batch)
                self._backoff = 0.0

    def flush_batch(self, batch) -> None:
        """Write one batch everywhere it goes, then commit it. Raises on a durable-tier failure."""
        for event in batch.events:
            event.synchronize()
        locs: list[Location | None] = [None] * len(batch.items)
        wanted = [i for i, d in enumerate(batch.durable) if d]
        if wanted and self.durable is not None:
            written = self._write_durable([batch.items[i] for i in wanted])
            for i, loc in zip(wanted, written):
                locs[i] = loc
        self.source.commit(batch, locs, self._write_remote(batch))

    def _write_durable(self, items) -> list[Location]:
        """All or nothing; evicts the durable tier's least valuable records while it is full."""
        while True:
            try:
                return self.durable.write_many(items)
            except TierFullError:
                need = sum(self.durable.footprint(it.payload.numel()) for it in items)
                if not self.make_room(need):
                    raise

    def _write_remote(self, batch) -> list[bool | None]:
        """Best effort, per item: True written, False dropped (counted by the commit, never raised:
        local tiers still hold the value), None not sent."""
        sent: list[bool | None] = [None] * len(batch.items)
        wanted = [i for i, r in enumerate(batch.remote) if r]
        if self.remote is None or not wanted:
            return sent
        try:
            ok = self.remote.write_many([batch.items[i] for i in wanted])
        except Exception as e:  # noqa: BLE001 - a remote failure must never fail a flush
            log.warning("remote tier write of %d item(s) failed: %s", len(wanted), e)
            ok = [False] * len(wanted)
        for i, x in zip(wanted, ok):
            sent[i] = bool(x)
        return sent

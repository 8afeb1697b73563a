"""Holding back the store's background work while a latency-critical call runs.

The flusher (the second stage of saving) runs Python in the caller's process, and
while it writes a batch it shares the interpreter with the serving thread. On the
lent H200 a 7B/4K restore's host work went from 17.6 to 31.6 ms while the flusher
was busy. So a caller that is about to do latency-critical host work (restoring
a prefix, issuing a first forward) holds the gate. While it is held the flusher
starts no new batch, for at most `max_hold_s` per batch, so durability is delayed
and never starved. A batch already being written finishes.

Anything that waits for the flusher overrides a hold: `flush()`, or a put that
needs the flusher to free DRAM (`urgent`). Holding the gate can therefore never
deadlock the store.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class Hold:
    """One caller's hold on the gate; `release()` (or leaving the `with` block) ends it, once."""

    def __init__(self, gate: "BackgroundGate"):
        self._gate = gate
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate.let_go()

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class BackgroundGate:
    """Counts holds and urgent waiters; the flusher asks `wait_clear` before each batch."""

    POLL_S = 0.05

    def __init__(self, max_hold_s: float):
        self.max_hold_s = max_hold_s
        self._cv = threading.Condition()
        self._holds = 0
        self._urgent = 0
        self.deferred = 0  # batches the flusher started late because of a hold

    @property
    def held(self) -> int:
        return self._holds

    def hold(self) -> Hold:
        with self._cv:
            self._holds += 1
        return Hold(self)

    def let_go(self) -> None:
        with self._cv:
            self._holds -= 1
            self._cv.notify_all()

    @contextmanager
    def urgent(self):
        """While inside, holds are ignored: someone waits for the flusher."""
        with self._cv:
            self._urgent += 1
            self._cv.notify_all()
        try:
            yield
        finally:
            with self._cv:
                self._urgent -= 1

    def wait_clear(self, stop: threading.Event) -> None:
        """Return once no hold is in force, a waiter is urgent, `stop` is set, or `max_hold_s` has passed."""
        with self._cv:
            if not self._holds or self._urgent or self.max_hold_s <= 0:
                return
            deadline = time.monotonic() + self.max_hold_s
            self.deferred += 1
            while self._holds and not self._urgent and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cv.wait(min(left, self.POLL_S))

"""When to talk to a server that failed: a circuit breaker with exponential backoff.

A dead server must not cost every caller a timeout. After a failure the breaker opens: callers
skip the server (a read misses, a write is dropped) without touching the network until the
backoff passes (0.1 s, doubling up to a cap); then exactly one caller probes with its real
request while the others keep skipping. The probe's success closes the breaker, its failure
doubles the backoff. Thread-safe; the caller reports every allowed attempt's outcome.
"""
from __future__ import annotations

import threading
import time
from typing import Callable


class Breaker:
    def __init__(self, base_s: float = 0.1, max_s: float = 5.0, probe_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self._base = min(base_s, max_s)
        self._max = max_s
        self._probe_timeout = probe_timeout_s  # a probe whose caller vanished frees the slot after this
        self._clock = clock
        self._lock = threading.Lock()
        self._delay = 0.0  # 0: closed (up)
        self._retry_at = 0.0
        self._probe_since: float | None = None
        self._down_since = 0.0

    @property
    def up(self) -> bool:
        return self._delay == 0.0

    def allow(self) -> bool:
        """True: go ahead (the server is up, or this caller is the one probe)."""
        with self._lock:
            if self._delay == 0.0:
                return True
            now = self._clock()
            if now < self._retry_at:
                return False
            if self._probe_since is not None and now - self._probe_since < self._probe_timeout:
                return False
            self._probe_since = now
            return True

    def success(self) -> float | None:
        """Report a successful exchange; returns how long the server was down if this ends an outage."""
        with self._lock:
            if self._delay == 0.0:
                return None
            self._delay, self._probe_since = 0.0, None
            return self._clock() - self._down_since

    def failure(self) -> bool:
        """Report a failed exchange (connection, timeout); True if this starts an outage."""
        with self._lock:
            now = self._clock()
            first = self._delay == 0.0
            if first:
                self._down_since = now
                self._delay = self._base
            elif self._probe_since is not None:  # the probe failed: wait longer
                self._delay = min(self._delay * 2, self._max)
            self._probe_since = None
            self._retry_at = now + self._delay
            return first

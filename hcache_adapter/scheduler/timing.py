"""RestoreTimer: how long split NVMe restores took, for auto to learn from, without waiting for the device.

A restore's time is known only once its GPU work is done, and its last layer is
taken inside generate()'s first forward: waiting for the device there would stall
the host in the middle of that forward (and the GPU behind it, once the host
catches up). So the end of a restore is a CUDA event, and what it measured is read
at the next decision, when it has long finished. On a CPU the work is done when
the last layer is taken, and the host clock is the measure.

A call that also captured CUDA graphs (the first forward's, the projections') is
not counted: its one-time cost of hundreds of milliseconds says nothing about the
disk.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

import torch

PENDING_MAX = 8  # restores whose events are not read yet (a caller that never decides again keeps no more)


class RestoreTimer:
    def __init__(self, device: torch.device, captures: Callable[[], int], observe: Callable[[object, float], None]):
        """`captures()`: graphs captured so far; `observe(decision, seconds)`: what learns."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._captures = captures
        self._observe = observe
        self._pending: deque = deque(maxlen=PENDING_MAX)  # (decision, start event, end event)

    def start(self, decision) -> Callable[[], None]:
        """Start timing a restore made on `decision`; returns what to call once its last layer's work is
        queued (the restorer's `on_done`)."""
        before = self._captures()
        t0 = time.perf_counter()
        start = None
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))

        def on_done() -> None:
            if self._captures() != before:
                return
            if start is None:
                self._observe(decision, time.perf_counter() - t0)
                return
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self._pending.append((decision, start, end))

        return on_done

    def collect(self) -> int:
        """Hand every finished restore's time to `observe`, oldest first; returns how many."""
        n = 0
        while self._pending and self._pending[0][2].query():
            decision, start, end = self._pending.popleft()
            self._observe(decision, start.elapsed_time(end) / 1e3)
            n += 1
        return n

"""RestoreTimer: what auto's NVMe decisions cost, measured, without the host waiting for the device.

Two times per request: when the restore's last layer was ready (what the
bandwidth estimate models) and when generate()'s first forward ended (what the
user waits for; for a request auto left to the model's own prefill, the only
one). Both are known only once the GPU work is done, and the first is reached
inside generate()'s first forward: waiting for the device there would stall
the host mid-forward. So each end is a CUDA event, read at the next decision,
long finished by then. On a CPU the work is done when each point is reached, and
the host clock is the measure.

A call that also captured CUDA graphs (the first forward's, the projections') is
not counted: its one-time cost of hundreds of milliseconds says nothing about the
disk.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

import torch

PENDING_MAX = 8  # requests whose events are not read yet (a caller that never decides again keeps no more)


class Timing:
    """One request's marks: `restored()` once its restore's last layer is queued, `answered()` once
    generate()'s first forward has returned (each at most once; either may never come)."""

    def __init__(self, timer: "RestoreTimer", decision, n_tokens: int):
        self.decision, self.n_tokens = decision, n_tokens
        self._timer = timer
        self._captures = timer.captures()
        self._t0 = time.perf_counter()
        self._start = timer.event()
        self.marks: dict[str, object] = {}  # "restored" / "answered" -> event, or seconds on a CPU
        self.closed = False  # no more marks will come
        self.captured = False  # graphs were captured while it ran (known once closed)

    def restored(self) -> None:
        self._mark("restored")

    def answered(self) -> None:
        self._mark("answered")
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.captured = self._timer.captures() != self._captures

    def _mark(self, name: str) -> None:
        if name in self.marks or self.closed:
            return
        ev = self._timer.event()
        self.marks[name] = ev if ev is not None else time.perf_counter() - self._t0

    def ready(self) -> bool:
        return self.closed and all(not isinstance(m, torch.cuda.Event) or m.query() for m in self.marks.values())

    def seconds(self, name: str) -> float | None:
        m = self.marks.get(name)
        if isinstance(m, torch.cuda.Event):
            return self._start.elapsed_time(m) / 1e3
        return m


class RestoreTimer:
    def __init__(self, device: torch.device, captures: Callable[[], int], observe: Callable[..., None],
                 observe_everything: Callable[[int, float], None]):
        """`captures()`: graphs captured so far; `observe(decision, restore_s, answer_s)`: learns from a split
        restore (`answer_s` None when no first forward followed); `observe_everything(n_tokens, answer_s)`: from
        a request auto left to the model's own prefill."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.captures = captures
        self._observe = observe
        self._observe_everything = observe_everything
        self._pending: deque[Timing] = deque(maxlen=PENDING_MAX)

    def event(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def start(self, decision, n_tokens: int) -> Timing:
        """Start timing a request of `n_tokens` stored tokens made on `decision` (earlier ones get no more
        marks: their calls are over)."""
        for t in self._pending:
            t.close()
        timing = Timing(self, decision, n_tokens)
        self._pending.append(timing)
        return timing

    def collect(self) -> int:
        """Hand every finished request's times to the observers, oldest first; returns how many."""
        n = 0
        while self._pending and self._pending[0].ready():
            t = self._pending.popleft()
            n += 1
            if t.captured:
                continue
            restore_s, answer_s = t.seconds("restored"), t.seconds("answered")
            if t.decision.estimate is not None and restore_s is not None:
                self._observe(t.decision, restore_s, answer_s)
            elif t.decision.estimate is None and answer_s is not None:
                self._observe_everything(t.n_tokens, answer_s)
        return n

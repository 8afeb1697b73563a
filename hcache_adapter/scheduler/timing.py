"""RestoreTimer: what auto's NVMe decisions cost, measured, without the host waiting for the device.

Per request: when the recomputation of its leading layers ended (what one layer
of recomputation costs at this length, measured), when the restore's last layer
was ready, what its reads from NVMe delivered (bytes over the time a read was in
flight: the disk as a restore sees it), and when generate()'s first forward
ended (what the user waits for; for a request auto left to the model's own
prefill, the only one). The GPU ends are known only once the GPU work is done,
and some are reached inside generate()'s first forward: waiting for the device
there would stall the host mid-forward. So each is a CUDA event, read at the
next decision, long finished by then. On a CPU the work is done when each point
is reached, and the host clock is the measure.

A call that paid a one-time cost is not counted: capturing CUDA graphs (the
first forward's, the projections') takes hundreds of milliseconds, and allocating
a restore's buffers (pinned staging for reads from NVMe: 640 MiB at 16K) tens;
neither says anything about the disk. `history` keeps the last outcomes, counted
or not, for whoever asks why auto chose what it did.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

PENDING_MAX = 8  # requests whose events are not read yet (a caller that never decides again keeps no more)
HISTORY = 32  # outcomes kept for diagnostics


@dataclass(frozen=True)
class Outcome:
    """What one timed request took: `recompute_layers` of `n_tokens` stored tokens recomputed, done after
    `recompute_s` (None: none recomputed, or auto left everything to the model's prefill); its restore's last
    layer ready after `restore_s` (None: no restore ran); `read_bytes` read from NVMe while a read was in
    flight for `read_s`; its first forward's end after `answer_s` (None: no forward followed). `counted` is
    False when a one-time cost made it say nothing."""

    n_tokens: int
    recompute_layers: int
    restore_s: float | None
    answer_s: float | None
    counted: bool
    recompute_s: float | None = None
    read_bytes: int = 0
    read_s: float = 0.0

    @property
    def ttft_s(self) -> float | None:
        """The request's time to its first token, as far as it was measured."""
        return self.answer_s if self.answer_s is not None else self.restore_s


class Timing:
    """One request's marks: `recomputed()` once its leading layers' recomputation is queued, `restored()`
    once its restore's last layer is, `answered()` once generate()'s first forward has returned (each at most
    once; any may never come)."""

    def __init__(self, timer: "RestoreTimer", decision, n_tokens: int):
        self.decision, self.n_tokens = decision, n_tokens
        self._timer = timer
        self._costs = timer.one_time_costs()
        self._t0 = time.perf_counter()
        self._start = timer.event()
        self.marks: dict[str, object] = {}  # "recomputed" / "restored" / "answered" -> event, or seconds on a CPU
        self.read = None  # loader.ReadTime of its reads from NVMe
        self.closed = False  # no more marks will come
        self.paid_once = False  # a one-time cost (graphs captured, buffers allocated) fell in it (known once closed)

    def recomputed(self) -> None:
        self._mark("recomputed")

    def restored(self, read=None) -> None:
        if not self.closed and "restored" not in self.marks:
            self.read = read
        self._mark("restored")

    def answered(self) -> None:
        self._mark("answered")
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.paid_once = self._timer.one_time_costs() != self._costs

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

    def outcome(self) -> Outcome:
        read = self.read
        return Outcome(self.n_tokens, self.decision.recompute_layers, self.seconds("restored"),
                       self.seconds("answered"), not self.paid_once, self.seconds("recomputed"),
                       read.nbytes if read is not None else 0, read.busy_s if read is not None else 0.0)


class RestoreTimer:
    def __init__(self, device: torch.device, one_time_costs: Callable[[], int],
                 learn: Callable[[object, Outcome], None]):
        """`one_time_costs()`: a count that grows with every one-time cost paid so far (graphs captured,
        buffers allocated); `learn(decision, outcome)`: handed each counted request's outcome."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.one_time_costs = one_time_costs
        self._learn = learn
        self._pending: deque[Timing] = deque(maxlen=PENDING_MAX)
        self.history: deque[Outcome] = deque(maxlen=HISTORY)

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
        """Hand every finished request's outcome to the learner, oldest first; returns how many."""
        n = 0
        while self._pending and self._pending[0].ready():
            t = self._pending.popleft()
            n += 1
            outcome = t.outcome()
            self.history.append(outcome)
            if outcome.counted and outcome.ttft_s is not None:
                self._learn(t.decision, outcome)
        return n

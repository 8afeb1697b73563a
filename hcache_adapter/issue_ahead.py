"""How much of a memory-tier restore to queue before generate() takes its first layer.

A restore queues its first layers' copies and projections, returns, and generate() then prepares its
first forward on the host (its configuration, masks, positions: 4-8 ms on the lent H200's hosts) before
the model takes layer 0. The rest of the restore is queued as the model takes layers, interleaved with
the captured forward's segments, whose GPU work then fills the gaps the copies leave the compute stream
instead of running after the restore. Queue too little up front and the copy engine runs dry during
generate()'s set-up; too much and the forward runs after the restore again. So the budget is the copies
that last through the set-up as this process has measured it on its last restores (the host's pace
varies from machine to machine: 4.7 ms on one lease, 7.9 on another), with a margin.

Measured on the lent H200, 7B shape at 4K (TTFT timeline, twelfth session): a host with a 4.7 ms set-up
256 MiB 26.2 ms, 512 MiB 26.5, 1 GiB 27.0, everything 27.5; a host with a 7.9 ms set-up 256 MiB 32.9,
everything 31.2 (256 MiB is 4.9 ms of copies there: the copy engine waited ~3 ms).

That reasoning holds while the GPU takes longer over a layer than the host takes to queue it. With short
layers (a 1K context: 8 MiB of hidden states, 0.15 ms of copies, against ~0.3 ms of host time to queue
its read and projection) the GPU keeps up with whatever the host queues, so layers queued ahead only
push generate()'s set-up and first forward later, and the forward's GPU time then runs after all of it.
So the host's time per queued layer is measured too (`observe_issue`; the median of the last few, which
drops the restores that capture graphs), and when it is at least the copies' time of a layer only one
layer is queued ahead: the rest is queued between the forward's segments, which then run as it arrives.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

COPY_BYTES_PER_S = 55e9  # pinned host-to-device copies on the lent H200 (a slower link only queues more)


@dataclass
class IssueAhead:
    """The bytes to queue ahead: `fixed` when set, else copies for `margin` x the measured set-up time.

    `observe(seconds)` feeds the host time from a restore's return to the model taking its first layer
    (an exponentially weighted mean with weight `weight`); `initial_s` stands in before any is measured.
    `observe_issue(seconds, layers)` feeds the host time queuing layers took; `budget(layer_bytes)` is
    then one byte (one layer) when that is at least `layer_bytes`' copies (see the module doc)."""

    fixed: int | None = None
    bytes_per_s: float = COPY_BYTES_PER_S
    margin: float = 1.5
    floor: int = 128 << 20
    initial_s: float = 0.005
    weight: float = 0.3
    setup_s: float | None = None  # the measured set-up (None: none yet)
    issue_window: int = 9
    _issue: deque = field(init=False, repr=False)  # host seconds per queued layer, the last `issue_window`

    def __post_init__(self):
        if self.fixed is not None and self.fixed < 1:
            raise ValueError(f"issue_ahead_bytes must be positive, got {self.fixed}")
        if self.bytes_per_s <= 0 or self.margin <= 0 or not 0 < self.weight <= 1 or self.floor < 1:
            raise ValueError("IssueAhead needs a positive bandwidth, margin and floor, and a weight in (0, 1]")
        if self.issue_window < 1:
            raise ValueError(f"IssueAhead's issue_window must be at least 1, got {self.issue_window}")
        self._issue = deque(maxlen=self.issue_window)

    @property
    def issue_s(self) -> float | None:
        """Host seconds to queue one layer: the median of the last `issue_window` measured (None: none yet)."""
        return statistics.median(self._issue) if self._issue else None

    def host_bound(self, layer_bytes: int) -> bool:
        """Whether the host queues a layer of `layer_bytes` no faster than the copy engine moves it."""
        issue = self.issue_s
        return issue is not None and layer_bytes > 0 and issue >= layer_bytes / self.bytes_per_s

    def budget(self, layer_bytes: int = 0) -> int:
        """Bytes to queue ahead for a restore whose layers are `layer_bytes` each (0: not known)."""
        if self.fixed is not None:
            return self.fixed
        if self.host_bound(layer_bytes):
            return 1
        seconds = self.initial_s if self.setup_s is None else self.setup_s
        return max(self.floor, int(self.bytes_per_s * seconds * self.margin))

    def observe(self, seconds: float) -> None:
        """A restore's set-up took `seconds` of host time (ignored when negative or over a second: a
        caller that restored and then did something else before generating says nothing about generate())."""
        if not 0 <= seconds <= 1.0:
            return
        self.setup_s = seconds if self.setup_s is None else (1 - self.weight) * self.setup_s + self.weight * seconds

    def observe_issue(self, seconds: float, layers: int) -> None:
        """Queuing `layers` layers of a restore took `seconds` of host time."""
        if layers > 0 and seconds >= 0:
            self._issue.append(seconds / layers)

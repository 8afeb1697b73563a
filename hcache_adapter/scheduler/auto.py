"""AutoScheduler: `auto`'s decisions, and what it learns from the restores it runs.

Two decisions: at save time, how each layer is saved (hidden state "H" or K/V
"K", `choose_save_plan`); at restore time, how many leading layers to recompute
from tokens instead of loading, for the tier the state is actually in
(`restore_estimate`). Recomputing every layer means "no restore": the caller's
own prefill of all tokens in one pass does that best.

The profile's NVMe bandwidth was measured with nothing else running; while the
compute thread recomputes, reads go slower (they share the CPU and the GIL).
So after a split restore the measured time corrects NVMe's bandwidth for later
plans (`observe`): the scale is the median of the last few restores' estimated
over measured times (at most 1), so one outlier (a call that also captured
graphs, a disk hiccup) neither locks loading out nor lets it back in. When what
was learned makes every restore recompute everything, every `REPROBE_EVERY`-th
such restore tries the split the profile itself would choose, so a disk that
got faster is seen again. Only NVMe: from memory tiers a restore's time is
mostly fixed CPU cost, which says nothing about bandwidth.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Callable

from hcache_adapter.layout import StateLayout
from hcache_adapter.scheduler.planner import (
    MEMORY_TIERS,
    RECOMPUTE_MARGIN,
    RestoreEstimate,
    choose_save_plan,
    effective_bandwidth,
    estimate,
    min_recompute,
    restore_estimate,
    ttft_estimates,
)
from hcache_adapter.scheduler.profile import Profile


@dataclass(frozen=True)
class SplitDecision:
    recompute_layers: int
    estimate: RestoreEstimate | None = None  # set for a split NVMe restore, the kind `observe` learns from
    everything_s: float = 0.0  # the estimate of recomputing every layer instead
    n_tokens: int = 0  # the stored tokens it was made for


@dataclass(frozen=True)
class _Sample:
    """One split NVMe restore: estimated / measured restore time, and what the user waited in all."""

    ratio: float
    answer_s: float
    everything_s: float  # the estimate of recomputing every layer instead
    n_tokens: int


LEARN_WINDOW = 5  # split NVMe restores whose estimated / measured time `observe` keeps
REPROBE_EVERY = 16  # restores recomputed everything for what was learned, between two tries of the profile's split


class AutoScheduler:
    def __init__(self, layout: StateLayout, profile: Callable[[], Profile], plan: str | None = None):
        """`profile`: called when a decision first needs it (measuring one takes seconds)."""
        if plan is not None:
            layout.check_plan(plan)
        self.layout = layout
        self._profile = profile
        self.explicit_plan = plan
        self._samples: deque[_Sample] = deque(maxlen=LEARN_WINDOW)  # the last split restores
        self._everything: dict[int, deque[float]] = {}  # stored tokens -> measured TTFTs of recomputing everything
        self._held_back = 0  # restores that recomputed everything since the last split, for what was learned
        self._saved_plan: tuple | None = None  # ((profile id, tiers), plan)

    @property
    def profile(self) -> Profile:
        return self._profile()

    @property
    def nvme_efficiency(self) -> float:
        """NVMe bandwidth split restores have seen / the profile's: the median of the last `LEARN_WINDOW`, a
        restore that lost to recomputing everything counting 0 (judged against measured prefills of that
        many tokens when there are some, else against the estimate; re-judged as measurements come)."""
        if not self._samples:
            return 1.0
        return min(1.0, statistics.median(0.0 if self._lost(x) else x.ratio for x in self._samples))

    def _lost(self, sample: _Sample) -> bool:
        measured = self._everything.get(sample.n_tokens)
        return sample.answer_s > (statistics.median(measured) if measured else sample.everything_s)

    def save_plan(self, tiers: tuple[str, ...]) -> str:
        """The plan chunks are saved with: explicit, or the cheapest to restore over `tiers` (computed once
        per profile and tiers: it is asked for on every generate, and weighing every split is O(L^3))."""
        if self.explicit_plan:
            return self.explicit_plan
        profile = self.profile
        key = (id(profile), tiers)
        if self._saved_plan is None or self._saved_plan[0] != key:
            sources = tuple(t for t in tiers if t in profile.read_bytes_per_s)
            self._saved_plan = (key, choose_save_plan(profile, sources=sources))
        return self._saved_plan[1]

    def split(self, plan: str, n_tokens: int, sources: dict[str, int], depth: int, *, suffix_tokens: int = 0,
              captured: bool = False) -> SplitDecision:
        """How many leading layers to recompute for state spread over `sources` (bytes per tier).

        From memory tiers the choice is all or nothing, on the whole time to first
        token (the host's work included: with a few short chunks and no captured
        first forward, one plain prefill can win); from NVMe, the split that
        balances reading against recomputing.
        """
        profile = self.profile
        known = {s: b for s, b in sources.items() if s in profile.read_bytes_per_s}
        tier = max(known, key=known.get) if known else None
        eff = self.nvme_efficiency if known.get("nvme") else 1.0
        bw = effective_bandwidth(profile, known, scale={"nvme": eff})
        est = restore_estimate(profile, plan, n_tokens, tier or "dram", depth=depth, bytes_per_s=bw) if bw > 0 else None
        if known.get("nvme") and eff < 1.0 and (est is None or est.recompute_layers == len(plan)):
            self._held_back += 1  # what was learned says recompute; now and then try the profile's split again
            if self._held_back >= REPROBE_EVERY:
                bw = effective_bandwidth(profile, known)
                est = restore_estimate(profile, plan, n_tokens, tier, depth=depth, bytes_per_s=bw)
        if est is None:
            return SplitDecision(len(plan))
        r = est.recompute_layers
        if 0 < r < len(plan) and tier == "nvme":
            self._held_back = 0
            everything = estimate(profile, plan, len(plan), n_tokens, bw, depth=depth)
            return SplitDecision(r, est, everything.total_s, n_tokens)
        if tier in MEMORY_TIERS and r < len(plan):
            ttft = ttft_estimates(profile, plan, n_tokens, suffix_tokens, bw, recompute_layers=r, depth=depth,
                                  chunk_tokens=self.layout.chunk_tokens, captured=captured)
            if ttft["recompute"] < ttft["load"] * (1 - RECOMPUTE_MARGIN):
                return SplitDecision(len(plan))
        return SplitDecision(max(r, min_recompute(plan)))

    def observe(self, decision: SplitDecision, seconds: float, answer_s: float | None = None) -> None:
        """Learn from a split NVMe restore whose layers were ready after `seconds`, and whose first forward (if
        one followed) ended after `answer_s` (not a call that also captured graphs, whose one-time cost says
        nothing about the disk)."""
        if decision.estimate is None or seconds <= 0:
            return
        self._samples.append(_Sample(min(1.0, decision.estimate.total_s / seconds),
                                     seconds if answer_s is None else answer_s, decision.everything_s,
                                     decision.n_tokens))

    def observe_everything(self, n_tokens: int, answer_s: float) -> None:
        """Learn what recomputing every layer of `n_tokens` stored tokens took, to its first forward's end
        (the estimate of it, from a profile fitted on shorter prompts, can be off by 10% at 16K)."""
        if answer_s > 0:
            self._everything.setdefault(n_tokens, deque(maxlen=LEARN_WINDOW)).append(answer_s)
            if len(self._everything) > 64:  # a few lengths matter; forget the oldest
                self._everything.pop(next(iter(self._everything)))

"""AutoScheduler: `auto`'s decisions, and what it learns from the restores it runs.

Two decisions: at save time, how each layer is saved (hidden state "H" or K/V
"K", `choose_save_plan`); at restore time, how many leading layers to recompute
from tokens instead of loading, for the tier the state is actually in
(`restore_estimate`). Recomputing every layer means "no restore": the caller's
own prefill of all tokens in one pass does that best.

The profile's NVMe bandwidth was measured with nothing else running; while the
compute thread recomputes, reads go slower (they share the CPU and the GIL).
So after a split restore the measured time corrects NVMe's bandwidth for later
plans (`observe`): down when it ran over its estimate, off altogether when it
ran slower than recomputing everything would have, slowly back up when it
holds. Only NVMe: from memory tiers a restore's time is mostly fixed CPU cost,
which says nothing about bandwidth.
"""
from __future__ import annotations

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


class AutoScheduler:
    def __init__(self, layout: StateLayout, profile: Callable[[], Profile], plan: str | None = None):
        """`profile`: called when a decision first needs it (measuring one takes seconds)."""
        if plan is not None:
            layout.check_plan(plan)
        self.layout = layout
        self._profile = profile
        self.explicit_plan = plan
        self.nvme_efficiency = 1.0  # NVMe bandwidth split restores have seen / the profile's

    @property
    def profile(self) -> Profile:
        return self._profile()

    def save_plan(self, tiers: tuple[str, ...]) -> str:
        if self.explicit_plan:
            return self.explicit_plan
        profile = self.profile
        return choose_save_plan(profile, sources=tuple(t for t in tiers if t in profile.read_bytes_per_s))

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
        if known.get("nvme") and self.nvme_efficiency <= 0:  # learned: loading from NVMe loses to recomputation
            return SplitDecision(len(plan))
        bw = effective_bandwidth(profile, known, scale={"nvme": self.nvme_efficiency})
        est = restore_estimate(profile, plan, n_tokens, tier or "dram", depth=depth, bytes_per_s=bw)
        r = est.recompute_layers
        if 0 < r < len(plan) and tier == "nvme":
            everything = estimate(profile, plan, len(plan), n_tokens, bw, depth=depth)
            return SplitDecision(r, est, everything.total_s)
        if tier in MEMORY_TIERS and r < len(plan):
            ttft = ttft_estimates(profile, plan, n_tokens, suffix_tokens, bw, recompute_layers=r, depth=depth,
                                  chunk_tokens=self.layout.chunk_tokens, captured=captured)
            if ttft["recompute"] < ttft["load"] * (1 - RECOMPUTE_MARGIN):
                return SplitDecision(len(plan))
        return SplitDecision(max(r, min_recompute(plan)))

    def observe(self, decision: SplitDecision, seconds: float) -> None:
        """Learn from a split NVMe restore that took `seconds` (its work finished)."""
        if decision.estimate is None:
            return
        eff = self.nvme_efficiency
        if seconds > decision.everything_s:
            eff = 0.0  # slower than recomputing everything would have been: stop loading from NVMe
        elif seconds > decision.estimate.total_s * 1.05:
            eff *= decision.estimate.total_s / seconds
        else:
            eff = min(1.0, eff * 1.05)
        self.nvme_efficiency = eff

"""AutoScheduler: `auto`'s decisions, and what it learns from the restores it runs.

Two decisions: at save time, how each layer is saved (hidden state "H" or K/V
"K", `choose_save_plan`); at restore time, how many leading layers to recompute
from tokens instead of loading, for the tier the state is actually in
(`restore_estimate`). Recomputing every layer means "no restore": the caller's
own prefill of all tokens in one pass does that best.

From NVMe a split balances two rates, and both are measured as requests run
(`learn`), since the profile's are not what a restore sees:
- the disk's bandwidth, as the restore's own reads delivered it (they share
  the CPU and the interpreter with the compute thread): the median of the last
  few restores over the profile's, at most 1, so that one outlier (a disk
  hiccup) neither locks loading out nor lets it back in;
- one layer's recomputation at that length as a split runs it (beside the
  readers: 15% slower per layer than the model's own prefill at 4K on the lent
  H200), else as the model's prefill ran it: the profile's, fitted on shorter
  prompts, was off by 0.9x-1.7x at 16K there.
And each split is judged by the user's time to first token against the measured
prefill of that length; a length with splits but no measured prefill leaves one
request to the model's prefill to measure it (`EXPLORE_MAX` at most). A split
that lost is not chosen again for that length until `REPROBE_EVERY` requests
have recomputed everything instead (a disk that got faster is seen again the
same way). Only NVMe: from memory tiers a restore's time is mostly fixed CPU
cost, which says nothing about bandwidth.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections import OrderedDict, deque
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
from hcache_adapter.scheduler.timing import Outcome


@dataclass(frozen=True)
class SplitDecision:
    recompute_layers: int
    estimate: RestoreEstimate | None = None  # set for a split NVMe restore, the kind `learn` judges
    everything_s: float = 0.0  # the estimate of recomputing every layer instead
    n_tokens: int = 0  # the stored tokens it was made for
    layers: int = 0  # the model's


LEARN_WINDOW = 5  # measurements kept of each rate (per length for recomputation)
REPROBE_EVERY = 16  # requests at one length recomputed everything for what was learned, between two tries of a split
LENGTHS_KEPT = 64  # stored lengths whose measurements are kept (the oldest forgotten)
EXPLORE_MAX = 3  # requests at one length left to the model's prefill to measure it, at most


def _count(counts: dict[int, int], n_tokens: int) -> int:
    """One more for `n_tokens` in a dict of a bounded number of lengths; the new count."""
    counts[n_tokens] = counts.pop(n_tokens, 0) + 1
    if len(counts) > LENGTHS_KEPT:
        counts.pop(next(iter(counts)))
    return counts[n_tokens]


class _PerLength(OrderedDict):
    """Measurements per stored length, of a bounded number of lengths (a few matter; forget the oldest)."""

    def add(self, n_tokens: int, seconds: float) -> None:
        self.setdefault(n_tokens, deque(maxlen=LEARN_WINDOW)).append(seconds)
        self.move_to_end(n_tokens)
        if len(self) > LENGTHS_KEPT:
            self.popitem(last=False)

    def median(self, n_tokens: int) -> float | None:
        seen = self.get(n_tokens)
        return statistics.median(seen) if seen else None


class AutoScheduler:
    def __init__(self, layout: StateLayout, profile: Callable[[], Profile], plan: str | None = None):
        """`profile`: called when a decision first needs it (measuring one takes seconds)."""
        if plan is not None:
            layout.check_plan(plan)
        self.layout = layout
        self._profile = profile
        self.explicit_plan = plan
        self._bandwidth: deque[float] = deque(maxlen=LEARN_WINDOW)  # NVMe as restores read it / the profile's
        self._layer_s = _PerLength()  # one layer's recomputation inside a split restore, measured
        self._prefill_s = _PerLength()  # time to first token of requests left to the model's own prefill
        self._explored: dict[int, int] = {}  # stored length -> requests left to the prefill to measure it
        self._lost: dict[int, set[int]] = {}  # stored length -> splits (recomputed layers) that lost there
        self._held_back: dict[int, int] = {}  # stored length -> requests recomputed since a split was tried
        self._saved_plan: tuple | None = None  # ((profile id, tiers), plan)

    @property
    def profile(self) -> Profile:
        return self._profile()

    @property
    def nvme_efficiency(self) -> float:
        """NVMe bandwidth split restores have seen / the profile's (the median of the last `LEARN_WINDOW`,
        at most 1; 1 before any)."""
        return min(1.0, statistics.median(self._bandwidth)) if self._bandwidth else 1.0

    @property
    def learned_nvme(self) -> bool:
        """Some split restore from NVMe has been learned from (so restores from NVMe happen here)."""
        return bool(self._lost)

    def baseline(self, n_tokens: int) -> float | None:
        """The time to first token of leaving `n_tokens` stored tokens to the model's prefill, measured (None
        before any: a split's own recomputed layers ran slower beside its readers, so they do not tell)."""
        return self._prefill_s.median(n_tokens)

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
        L = len(plan)
        if sources.get("nvme"):
            profile = self.fitted(profile, n_tokens, L)
        known = {s: b for s, b in sources.items() if s in profile.read_bytes_per_s}
        tier = max(known, key=known.get) if known else None
        eff = self.nvme_efficiency if known.get("nvme") else 1.0
        bw = effective_bandwidth(profile, known, scale={"nvme": eff})
        est = restore_estimate(profile, plan, n_tokens, tier or "dram", depth=depth, bytes_per_s=bw) if bw > 0 else None
        if tier == "nvme":
            lost = self._lost.get(n_tokens, set())
            r = est.recompute_layers if est is not None else L
            if r in lost or (r == L and eff < 1.0):  # what was learned says recompute everything
                held = _count(self._held_back, n_tokens)
                if held < REPROBE_EVERY:
                    return SplitDecision(L)
                self._held_back[n_tokens] = 0  # now and then try a split again: with the profile's bandwidth
                bw = effective_bandwidth(profile, known)
                est = restore_estimate(profile, plan, n_tokens, tier, depth=depth, bytes_per_s=bw)
                lost.discard(est.recompute_layers)
        if est is None:
            return SplitDecision(L)
        r = est.recompute_layers
        if 0 < r < L and tier == "nvme":
            if n_tokens in self._lost and self.baseline(n_tokens) is None:
                if _count(self._explored, n_tokens) <= EXPLORE_MAX:  # splits ran here, against what? measure
                    return SplitDecision(L)
            everything = estimate(profile, plan, L, n_tokens, bw, depth=depth)
            return SplitDecision(r, est, everything.total_s, n_tokens, L)
        if tier in MEMORY_TIERS and r < len(plan):
            ttft = ttft_estimates(profile, plan, n_tokens, suffix_tokens, bw, recompute_layers=r, depth=depth,
                                  chunk_tokens=self.layout.chunk_tokens, captured=captured)
            if ttft["recompute"] < ttft["load"] * (1 - RECOMPUTE_MARGIN):
                return SplitDecision(len(plan))
        return SplitDecision(max(r, min_recompute(plan)))

    def fitted(self, profile: Profile, n_tokens: int, layers: int) -> Profile:
        """`profile` with its recomputation cost scaled to what one layer of `n_tokens` stored tokens measured,
        inside split restores, else in the model's prefill (unchanged before any measurement; the scale kept
        within 0.2-5x, so that no outlier runs away with it)."""
        measured = self._layer_s.median(n_tokens)
        if measured is None and self.baseline(n_tokens) is not None:
            measured = self.baseline(n_tokens) / layers
        est = profile.recompute_seconds(n_tokens)
        if measured is None or est <= 0:
            return profile
        scale = min(5.0, max(0.2, measured / est))
        return dataclasses.replace(profile, recompute_coef=tuple(c * scale for c in profile.recompute_coef))

    def learn(self, decision: SplitDecision, outcome: Outcome) -> None:
        """Learn from a request auto decided (`RestoreTimer` hands over only those without one-time costs).

        Left to the model's prefill (recomputing everything): its time to first token. A split NVMe restore:
        one layer's recomputation, the disk's bandwidth, and whether it beat the measured prefill."""
        n, ttft = outcome.n_tokens, outcome.ttft_s
        if ttft is None or ttft <= 0:
            return
        if decision.estimate is None:
            if outcome.restore_s is None and decision.recompute_layers > 0:
                self._prefill_s.add(n, ttft)
            return
        r = decision.recompute_layers
        if outcome.recompute_s and r:
            self._layer_s.add(n, outcome.recompute_s / r)
        profiled = self.profile.read_bytes_per_s.get("nvme", 0.0)
        if outcome.read_bytes and outcome.read_s > 0 and profiled > 0:
            self._bandwidth.append(outcome.read_bytes / outcome.read_s / profiled)
        lost = self._lost.setdefault(n, set())
        if len(self._lost) > LENGTHS_KEPT:
            self._lost.pop(next(iter(self._lost)))
        baseline = self.baseline(n)
        if baseline is not None and ttft > baseline:
            lost.add(r)
        else:
            lost.discard(r)

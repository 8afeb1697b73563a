"""AutoSplits: `auto`'s restore-time decisions for one model's restores, and the timing it learns from.

Each restore asks how many leading layers to recompute (`decide`). Before
deciding, what earlier requests took is read back (their GPU work long done by
then, so nobody waits for the device) and handed to the scheduler. A prefix
wholly on NVMe, once auto has judged restores from NVMe, is decided from where
its last layer lives (`guess`): when the answer is to recompute everything,
locating thousands of chunk entries first would be auto's only cost over the
model's own prefill.
"""
from __future__ import annotations

from typing import Callable

import torch

from hcache_adapter.layout import StateLayout
from hcache_adapter.prefix import last_layer_tiers
from hcache_adapter.scheduler.auto import AutoScheduler, SplitDecision
from hcache_adapter.scheduler.timing import RestoreTimer, Timing


class AutoSplits:
    def __init__(self, scheduler: AutoScheduler, store, layout: StateLayout, device: torch.device, *,
                 ring_depth: Callable[[int, str], int], one_time_costs: Callable[[], int]):
        """`ring_depth(chunks, plan)`: layers the restore's loader can read ahead; `one_time_costs()`: a count
        that grows with each graph captured or buffer allocated (a request that paid one teaches nothing)."""
        self.scheduler = scheduler
        self.store = store
        self.layout = layout
        self._ring_depth = ring_depth
        self.timer = RestoreTimer(device, one_time_costs, scheduler.learn)

    def decide(self, plan: str, chunks: int, sources: dict[str, int], *, suffix: int,
               captured: bool) -> SplitDecision:
        """The split for `chunks` stored chunks whose bytes lie in `sources` (tier -> bytes)."""
        self.timer.collect()
        return self.scheduler.split(plan, chunks * self.layout.chunk_tokens, sources, self._ring_depth(chunks, plan),
                                    suffix_tokens=suffix, captured=captured)

    def guess(self, plan: str, digests: list[str], *, suffix: int, captured: bool) -> SplitDecision | None:
        """The split for a prefix wholly on NVMe, from its last layer's locations, once auto has judged restores
        from NVMe here (before, the look would be an extra cost for memory-tier restores); None before, or
        when the prefix is not (wholly) there."""
        if not self.scheduler.learned_nvme:
            return None
        if last_layer_tiers(self.store, self.layout, plan, digests) != {"nvme"}:
            return None
        return self.decide(plan, len(digests), {"nvme": self.on_disk(plan, len(digests))}, suffix=suffix,
                           captured=captured)

    def on_disk(self, plan: str, chunks: int) -> int:
        """Bytes of `chunks` stored chunks saved with `plan`."""
        return self.layout.plan_bytes_per_token(plan) * chunks * self.layout.chunk_tokens

    def timing(self, decision: SplitDecision, chunks: int, sources: dict[str, int]) -> Timing | None:
        """A timing for a request auto learns from: a split NVMe restore, or one with state on NVMe that it
        left to the model's own prefill; None for the rest (memory tiers: fixed CPU costs, nothing to learn)."""
        everything = decision.recompute_layers >= self.layout.num_layers
        if decision.estimate is None and not (everything and sources.get("nvme")):
            return None
        return self.timer.start(decision, chunks * self.layout.chunk_tokens)

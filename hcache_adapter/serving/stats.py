"""Counters of where a request's context came from: the GPU, the store, or computed from tokens.

One `ServingStats` per HCache (`hc.stats`); the resident cache, the restore path
and the batched path each add to it. Plain integers, read and reset by the
caller (`serve-bench` takes differences around each run).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ServingStats:
    # GPU-resident contexts (`HCache(gpu_context_bytes=...)`)
    gpu_lookups: int = 0  # requests with at least one whole chunk that looked for a resident prefix
    gpu_hits: int = 0  # ... and started from one, restoring nothing
    gpu_misses: int = 0
    gpu_hit_tokens: int = 0
    gpu_admitted: int = 0  # contexts made resident
    gpu_superseded: int = 0  # resident contexts dropped because a longer one of the same prefix came in
    gpu_evictions: int = 0  # dropped by the eviction policy to stay under budget
    gpu_rejected: int = 0  # larger than the whole budget: never resident
    gpu_bytes: int = 0  # K/V bytes resident now
    gpu_entries: int = 0
    gpu_budget: int = 0
    # restores from the store and computation
    restores: int = 0
    restored_tokens: int = 0  # loaded from the store (hidden states or K/V)
    recomputed_tokens: int = 0  # prefix tokens a restore recomputed from tokens ("recompute", auto's R layers)
    row_prefill_tokens: int = 0  # prompt tokens the batched path computed per row, unpadded

    @property
    def gpu_hit_ratio(self) -> float:
        return self.gpu_hits / self.gpu_lookups if self.gpu_lookups else 0.0

    def count_restore(self, tokens: int, recomputed: bool, from_gpu: bool) -> None:
        """One restore's result: `tokens` of prefix, recomputed from tokens or loaded (GPU hits: counted there)."""
        self.restores += 1
        if from_gpu:
            return
        if recomputed:
            self.recomputed_tokens += tokens
        else:
            self.restored_tokens += tokens

    def as_dict(self) -> dict:
        d = asdict(self)
        d["gpu_hit_ratio"] = self.gpu_hit_ratio
        return d

    def minus(self, earlier: "ServingStats") -> dict:
        """Counters since `earlier` (a copy taken then); levels (bytes, entries, budget) as they are now."""
        now, then = asdict(self), asdict(earlier)
        levels = {"gpu_bytes", "gpu_entries", "gpu_budget"}
        return {k: (v if k in levels else v - then[k]) for k, v in now.items()}

    def copy(self) -> "ServingStats":
        return ServingStats(**asdict(self))

"""Hot contexts kept on the GPU between requests, under a byte budget.

After a request, the K/V of its context (prompt and output, cut to whole
chunks) can stay on the GPU; the next request that starts with that context
(the session's next turn, another question on the same document) then starts
from it and restores nothing. The budget is enforced by one of hstore's
eviction policies (`hstore.policy`: "lru", "s3fifo", or "cost", GDSF with the
restore time the planner estimates as the cost); evicting costs nothing, the
state being in the store already (every resident chunk was computed by a
request that saved it, or restored from the store).

An entry is keyed by the chained digest of its last chunk and indexed by
every chunk digest it covers, so a request sharing only its first k chunks
is served those k. An entry that a longer one of the same prefix contains is
dropped when the longer one comes in (the session moved on).

A hit hands out views of the resident tensors, never copies: transformers'
caches never write into the tensors they are given (`update` concatenates,
`crop` slices, beams index), so a generate() that starts from a hit leaves the
entry as it was. What is admitted is cloned, so an entry never aliases a
cache someone may keep writing (a static cache is written in place).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from hcache_adapter.compat import fill_layer, layer_kv
from hcache_adapter.lazycache import LazyCache
from hcache_adapter.layout import StateLayout
from hcache_adapter.restore import RestoreResult
from hcache_adapter.serving.stats import ServingStats
from hstore.errors import StoreConfigError
from hstore.policy import EvictionPolicy, make_eviction_policy

log = logging.getLogger(__name__)

GPU_SOURCE = "gpu-resident"  # RestoreResult.sources key of a hit
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Entry:
    key: bytes
    digests: list[str]
    layers: list[KV]  # per layer K, V: [1, kv_heads, tokens, head_dim]
    nbytes: int

    @property
    def tokens(self) -> int:
        return self.layers[0][0].shape[-2] if self.layers else 0


class _Views:
    """`LayerSource` over a resident entry: the first `n` positions of each layer, as views."""

    def __init__(self, entry: _Entry, n: int):
        self.layers, self.n = entry.layers, n

    def take(self, layer: int) -> KV:
        k, v = self.layers[layer]
        return k[..., : self.n, :], v[..., : self.n, :]


class ResidentContexts:
    """Recent contexts' K/V on the GPU, at most `budget_bytes` of them.

    `stored(digests)`: how many leading chunks the store holds; a resident
    prefix shorter than that is not used (restoring the longer one wins).
    `cost(tokens)`: the restore-time estimate the "cost" policy weighs entries by.
    """

    def __init__(self, budget_bytes: int, layout: StateLayout, model_config, *,
                 policy: str | EvictionPolicy = "lru", stats: ServingStats | None = None,
                 cost: Callable[[int], float] | None = None, stored: Callable[[list[str]], int] | None = None):
        _check_budget(budget_bytes)
        self.budget = budget_bytes
        self.layout = layout
        self.config = model_config
        self.policy = make_eviction_policy(policy)
        self.stats = stats if stats is not None else ServingStats()
        self.stats.gpu_budget = budget_bytes
        self.cost = cost
        self.stored = stored
        self._entries: dict[bytes, _Entry] = {}
        self._index: dict[str, dict[bytes, None]] = {}  # chunk digest -> entries covering it (oldest first)
        self.used = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- serving ---------------------------------------------------------------------
    def longest(self, tokens: Sequence[int]) -> int:
        """Tokens of `tokens`' longest resident prefix that leaves one token to run (no side effects)."""
        digests = self._digests(tokens)
        k, _ = self._longest(digests)
        return k * self.layout.chunk_tokens

    def restore(self, tokens: Sequence[int], *, lazy: bool) -> RestoreResult | None:
        """A RestoreResult over the longest resident prefix of `tokens`, or None (a miss: restore from the store).

        `lazy`: a LazyCache whose layers take their views when the model first uses
        them (what generate()'s captured prefill expects), else a DynamicCache.
        """
        t0 = time.perf_counter()
        digests = self._digests(tokens)
        if not digests:
            return None
        st = self.stats
        st.gpu_lookups += 1
        k, entry = self._longest(digests)
        stored = self.stored(digests) if entry is not None and self.stored is not None else 0
        if entry is None or stored > k:
            st.gpu_misses += 1
            return None
        self.policy.access(entry.key)
        st.gpu_hits += 1
        n = k * self.layout.chunk_tokens
        st.gpu_hit_tokens += n
        cache = self._cache(entry, n, lazy)
        nbytes = entry.nbytes * n // entry.tokens
        return RestoreResult(cache, n, sources={GPU_SOURCE: nbytes}, digests=digests[:k], stored_chunks=stored,
                             seconds=time.perf_counter() - t0)

    def admit(self, tokens: Sequence[int], layers: Sequence[KV], length: int) -> bool:
        """Keep the whole-chunk prefix of the first `length` positions of `layers` (one row each, for
        `tokens[:length]`) resident, evicting by policy to stay under budget. True if it is resident now."""
        C = self.layout.chunk_tokens
        w = min(length, len(tokens)) // C * C
        if w == 0 or not layers or any(k.shape[-2] < w or v.shape[-2] < w for k, v in layers):
            return False
        digests = self.layout.digests(list(tokens[:w]))
        key = digests[-1].encode()
        st = self.stats
        if key in self._entries:  # the same context again
            self.policy.access(key)
            return True
        if digests[-1] in self._index:  # a longer resident context holds this one
            self.policy.access(next(reversed(self._index[digests[-1]])))
            return True
        nbytes = sum(k[..., :w, :].numel() * k.element_size() + v[..., :w, :].numel() * v.element_size()
                     for k, v in layers)
        if nbytes > self.budget:
            st.gpu_rejected += 1
            return False
        for d in digests[:-1]:  # shorter contexts this one contains: superseded
            if d.encode() in self._entries:
                self._drop(d.encode())
                st.gpu_superseded += 1
        self._evict_until(self.budget - nbytes)
        kept = [(k[..., :w, :].clone(), v[..., :w, :].clone()) for k, v in layers]
        entry = _Entry(key, digests, kept, nbytes)
        self._entries[key] = entry
        for d in digests:
            self._index.setdefault(d, {})[key] = None
        self.used += nbytes
        self.policy.insert(key, nbytes, self.cost(w) if self.cost is not None else None)
        st.gpu_admitted += 1
        self._levels()
        return True

    def resize(self, budget_bytes: int) -> None:
        """A new budget; entries are evicted by policy until they fit it."""
        _check_budget(budget_bytes)
        self.budget = self.stats.gpu_budget = budget_bytes
        self._evict_until(budget_bytes)

    def clear(self) -> None:
        for key in list(self._entries):
            self.policy.remove(key)
            self._drop(key)

    # -- internals ---------------------------------------------------------------------
    def _digests(self, tokens: Sequence[int]) -> list[str]:
        n = self.layout.whole_chunks(len(tokens)) * self.layout.chunk_tokens
        return self.layout.digests(list(tokens[:n])) if n else []

    def _longest(self, digests: list[str]) -> tuple[int, _Entry | None]:
        for i in range(len(digests) - 1, -1, -1):  # chained digests: a match at i means 0..i match too
            keys = self._index.get(digests[i])
            if keys:
                return i + 1, self._entries[next(reversed(keys))]
        return 0, None

    def _evict_until(self, limit: int) -> None:
        while self.used > limit:
            victim = self.policy.pop_victim()
            if victim is None:
                raise RuntimeError("resident contexts: bytes are accounted but the policy tracks no entry")
            self._drop(victim)
            self.stats.gpu_evictions += 1

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.policy.remove(key)
        for d in entry.digests:
            keys = self._index.get(d)
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del self._index[d]
        self.used -= entry.nbytes
        self._levels()

    def _levels(self) -> None:
        self.stats.gpu_bytes = self.used
        self.stats.gpu_entries = len(self._entries)

    def _cache(self, entry: _Entry, n: int, lazy: bool):
        source = _Views(entry, n)
        if lazy:
            cache = LazyCache.for_model(self.config)
            for l, (k, _) in enumerate(entry.layers):
                if not cache.make_lazy(l, source, n, k.dtype, k.device):
                    fill_layer(cache, l, *source.take(l))
            return cache
        cache = DynamicCache(config=self.config)
        for l in range(len(entry.layers)):
            fill_layer(cache, l, *source.take(l))
        return cache


def _check_budget(budget_bytes) -> None:
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 0:
        raise StoreConfigError(f"gpu_context_bytes must be an int >= 0, got {budget_bytes!r}")


def planner_cost(profile: Callable[[], object], plan: Callable[[], str]) -> Callable[[int], float]:
    """The cost the "cost" policy weighs an entry of n tokens by: the planner's estimate of restoring it."""
    from hcache_adapter.scheduler.planner import restore_estimate

    def cost(n: int) -> float:
        p = profile()
        tiers = p.read_bytes_per_s
        source = "dram" if "dram" in tiers else max(tiers, key=tiers.get)
        return restore_estimate(p, plan(), n, source).total_s

    return cost


def make_resident(budget_bytes: int | None, layout: StateLayout, model_config, *, policy: str | EvictionPolicy,
                  stats: ServingStats, profile: Callable[[], object], plan: Callable[[], str],
                  stored: Callable[[list[str]], int] | None) -> ResidentContexts | None:
    """HCache's resident contexts for `gpu_context_bytes` (None: none kept). The planner's cost (which
    needs the hardware profile, measured once) is wired in only for the cost-aware policy."""
    if budget_bytes is None:
        return None
    eviction = make_eviction_policy(policy)
    cost = planner_cost(profile, plan) if eviction.name == "cost" else None
    return ResidentContexts(budget_bytes, layout, model_config, policy=eviction, stats=stats, cost=cost,
                            stored=stored)


def admit_generated(resident: ResidentContexts, out, cache, num_layers: int, device: torch.device) -> bool:
    """After a single-sequence generate(): keep the cache of prompt + output (whole chunks) resident.

    The cache holds every position but the last token's (generate() does not feed it). Caches of
    several rows (beams) or held elsewhere than on `device` (offloaded) are not kept.
    """
    seqs = getattr(out, "sequences", out)
    if not isinstance(seqs, torch.Tensor) or seqs.dim() != 2 or seqs.shape[0] != 1:
        return False
    layers = [layer_kv(cache, l) for l in range(num_layers)]
    if any(kv is None or kv[0].shape[0] != 1 or kv[0].device != device for kv in layers):
        return False
    tokens = seqs[0].tolist()
    return resident.admit(tokens, layers, len(tokens) - 1)

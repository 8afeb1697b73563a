"""The bubble-free scheduler: pure functions from a hardware profile to a plan.

Restoring a layer costs I/O (its hidden state or its K/V crossing from a tier
to the compute device) and compute (projecting a hidden state, or recomputing
the layer from tokens). I/O and compute run on different engines, layer by
layer, so a restore takes about max(total I/O, total compute) plus one layer of
pipeline fill. HCache's scheduler picks per layer how state is saved (hidden
"H" or K/V "K") and how many leading layers are recomputed from tokens instead
of loaded, so the two sides finish together.
"""
from __future__ import annotations

from dataclasses import dataclass

from hcache_adapter.manifest import HIDDEN, KV, RECOMPUTE
from hcache_adapter.scheduler.profile import Profile


@dataclass(frozen=True)
class RestoreEstimate:
    recompute_layers: int
    io_s: float
    compute_s: float
    total_s: float


def min_recompute(plan: str) -> int:
    """Layers saved as "R" are recomputed, and recomputation runs from layer 0: r >= last R + 1."""
    last = plan.rfind(RECOMPUTE)
    return last + 1


def estimate(
    profile: Profile, plan: str, recompute_layers: int, n_tokens: int, bytes_per_s: float, *, depth: int | None = None
) -> RestoreEstimate:
    """Predicted restore time of `n_tokens` when the first `recompute_layers` are recomputed.

    Simulates the two-engine pipeline: the I/O engine loads layers r, r+1, ...
    back to back, at most `depth` layers ahead of the compute engine (None:
    no limit); the
    compute engine first recomputes layers 0..r-1 from tokens, then projects
    each loaded hidden-state layer once its data has arrived (K/V layers need
    no compute).
    """
    r = recompute_layers
    if r < min_recompute(plan):
        raise ValueError(f"plan {plan!r} needs at least {min_recompute(plan)} recomputed layers")
    rec = profile.recompute_seconds(n_tokens)
    proj = profile.project_seconds(n_tokens)
    loaded = plan[r:]
    io_cost = [(profile.hidden_bytes_per_token if k == HIDDEN else profile.kv_bytes_per_token) * n_tokens / bytes_per_s
               for k in loaded]
    comp_cost = [proj if k == HIDDEN else 0.0 for k in loaded]
    io_done: list[float] = []
    comp_done: list[float] = []
    io_t, comp_t = 0.0, r * rec
    for i in range(len(loaded)):
        start = io_t if depth is None or i < depth else max(io_t, comp_done[i - depth])
        io_t = start + io_cost[i]
        io_done.append(io_t)
        comp_t = max(comp_t, io_t) + comp_cost[i]
        comp_done.append(comp_t)
    total = max(comp_t, io_t)
    return RestoreEstimate(r, sum(io_cost), r * rec + sum(comp_cost), total)


# A restore that loads state must beat recomputing everything by this much on paper before
# `auto` takes it: the estimate rests on bandwidths measured once, and a plan that wins by
# less may lose in practice (the disk slows down, the compute thread starves the reader).
RECOMPUTE_MARGIN = 0.10


def choose_recompute_layers(
    profile: Profile, plan: str, n_tokens: int, bytes_per_s: float, *, depth: int | None = None,
    margin: float = RECOMPUTE_MARGIN,
) -> RestoreEstimate:
    """The number of leading layers to recompute that minimises the estimated restore time.

    Recomputing every layer is the fallback: any other split must be estimated
    faster by more than `margin` (a fraction) to be chosen.
    """
    best = None
    for r in range(min_recompute(plan), len(plan) + 1):
        est = estimate(profile, plan, r, n_tokens, bytes_per_s, depth=depth)
        if best is None or est.total_s < best.total_s - 1e-12:
            best = est
    everything = estimate(profile, plan, len(plan), n_tokens, bytes_per_s, depth=depth)
    if best.total_s > everything.total_s * (1 - margin):
        return everything
    return best


def choose_save_plan(profile: Profile, n_tokens: int = 4096, sources: tuple[str, ...] | None = None) -> str:
    """Per-layer representation to save ("H"/"K"), best on average over the tiers state may be restored from.

    Every layer is saved (none as "R"), so a restore can still choose how much to
    recompute depending on where the state actually is (DRAM or NVMe). With
    multi-head attention hidden states are half of K+V and win; with strong GQA
    K+V are smaller than the hidden state and need no compute, so they win.
    """
    sources = sources or tuple(profile.read_bytes_per_s)
    L = profile.n_layers
    best_plan, best_key = None, None
    for h in range(L + 1):  # h layers saved as hidden states, the rest as K/V
        plan = KV * (L - h) + HIDDEN * h
        cost = sum(restore_estimate(profile, plan, n_tokens, s).total_s for s in sources)
        stored = h * profile.hidden_bytes_per_token + (L - h) * profile.kv_bytes_per_token
        key = (round(cost, 9), stored)  # equal time (e.g. both recomputed from a slow disk): store less
        if best_key is None or key < best_key:
            best_plan, best_key = plan, key
    return best_plan


def restore_estimate(profile: Profile, plan: str, n_tokens: int, source: str, *, depth: int | None = None,
                     bytes_per_s: float | None = None) -> RestoreEstimate:
    """The restore `auto` would run for state held in `source`.

    Only a slow tier (NVMe) is worth recomputing leading layers for: from
    memory tiers the pipeline is bound by the host CPU issuing work, which the
    estimate does not model, and a split that looks balanced on paper measured
    1.5-2x slower than loading everything on the lent H100. So from memory
    tiers nothing is recomputed beyond what the plan demands.
    """
    bw = profile.read_bytes_per_s[source] if bytes_per_s is None else bytes_per_s
    if source in MEMORY_TIERS:
        return estimate(profile, plan, min_recompute(plan), n_tokens, bw, depth=depth)
    return choose_recompute_layers(profile, plan, n_tokens, bw, depth=depth)


MEMORY_TIERS = ("gpu", "dram")


def effective_bandwidth(profile: Profile, bytes_by_source: dict[str, int], scale: dict[str, float] | None = None) -> float:
    """Bandwidth of a read spread over several tiers (they are read one after the other in the worst case).

    `scale` multiplies a tier's profiled bandwidth (what restores have shown it
    really delivers); a tier scaled to 0 makes the whole read infinitely slow.
    """
    scale = scale or {}
    total = sum(bytes_by_source.values())
    if total == 0:
        return max(profile.read_bytes_per_s.values())
    seconds = 0.0
    for s, b in bytes_by_source.items():
        if b:
            bw = profile.read_bytes_per_s[s] * scale.get(s, 1.0)
            if bw <= 0:
                return 0.0
            seconds += b / bw
    return total / seconds


def ttft_estimates(profile: Profile, plan: str, n_tokens: int, suffix_tokens: int, bytes_per_s: float, *,
                   recompute_layers: int | None = None, depth: int | None = None, chunk_tokens: int = 64,
                   captured: bool = False) -> dict[str, float]:
    """Time to first token of loading the prefix (with `recompute_layers` recomputed, default the least the
    plan allows) and of recomputing everything, counting the host's work as well as the GPU's.

    Loading: the host issues every chunk read and every layer's work (the GPU
    runs them as they come), then the first forward of the new tokens: replayed
    from a graph (GPU time only) or issued op by op (host time). Recomputing:
    one forward over prefix and new tokens, bound by the GPU or by issuing it.
    """
    r = min_recompute(plan) if recompute_layers is None else recompute_layers
    est = estimate(profile, plan, r, n_tokens, bytes_per_s, depth=depth)
    loaded = len(plan) - r
    host = loaded * (n_tokens // chunk_tokens) * profile.host_key_s + loaded * profile.host_layer_s
    if captured and profile.captured_forward_s > 0:
        load = max(host, est.total_s) + profile.captured_forward_s
    else:
        load = max(host + profile.forward_host_s, est.total_s)
    everything = max(profile.forward_host_s, len(plan) * profile.recompute_seconds(n_tokens + suffix_tokens))
    return {"load": load, "recompute": everything}

"""The profile `auto` plans with under tensor parallelism: the ranks' figures combined, plus the all-gather.

Every rank measures its own profile (its own link, its heads' projection, a
recomputation that includes the forward's all-reduces), in lockstep since the
recomputation probes run collectives; then the all-gather of a layer's
hidden-state shares is timed. `combine` makes one profile of them, the one
every rank plans with, so the ranks' decisions agree:

* reads: bytes of all ranks together (the whole hidden state once, every K/V
  shard) over the sum of the ranks' bandwidths, per tier the ranks share:
  the aggregate read bandwidth;
* compute: the slowest rank's projection and recomputation, the largest host
  costs (a layer is done when its last rank is);
* `tp_world` and `gather_coef`, which `Profile.project_seconds` adds to every
  hidden-state layer.

Rank 0's profile is saved and loaded like the single-process one (its file
name carries the degree); the others receive it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from hcache_adapter.parallel.tp import TensorParallel, all_gather_single
from hcache_adapter.scheduler.profile import Profile, fit_linear

_HOST_FIELDS = ("host_key_s", "host_layer_s", "forward_host_s", "captured_forward_s")


def combine(profiles: Sequence[Profile], gather_coef: tuple[float, float], probe_tokens: int = 4096) -> Profile:
    """One profile for a group of ranks from each rank's own (see the module doc)."""
    world = len(profiles)
    first = profiles[0]
    tiers = set(first.read_bytes_per_s)
    for p in profiles[1:]:
        tiers &= set(p.read_bytes_per_s)
    read = {t: sum(p.read_bytes_per_s[t] for p in profiles) for t in sorted(tiers)}
    slow_proj = max(profiles, key=lambda p: p.project_seconds(probe_tokens))
    slow_rec = max(profiles, key=lambda p: p.recompute_seconds(probe_tokens))
    host = {f: max(getattr(p, f) for p in profiles) for f in _HOST_FIELDS}
    return Profile(
        n_layers=first.n_layers,
        hidden_bytes_per_token=first.hidden_bytes_per_token,
        kv_bytes_per_token=sum(p.kv_bytes_per_token for p in profiles),
        read_bytes_per_s=read,
        project_coef=tuple(slow_proj.project_coef),
        recompute_coef=tuple(slow_rec.recompute_coef),
        device=first.device,
        dtype=first.dtype,
        notes={"ranks": [p.notes for p in profiles], "read_bytes_per_s_by_rank": [p.read_bytes_per_s for p in profiles]},
        tp_world=world,
        gather_coef=tuple(gather_coef),
        **host,
    )


def measure_gather(tp: TensorParallel, hidden_size: int, dtype: torch.dtype, lengths: Sequence[int]) -> tuple[float, float]:
    """Seconds of one layer's all-gather of n tokens' hidden state (n/N rows from each rank), fitted a + b*n."""
    from hcache_adapter.scheduler.profiling import time_median

    points = []
    for n in lengths:
        rows = max(1, -(-n // tp.world))
        share = torch.randn(rows, hidden_size, device=tp.device).to(dtype)
        out = torch.empty(tp.world * rows, hidden_size, device=tp.device, dtype=dtype)
        send, recv = share.view(-1).view(torch.uint8), out.view(-1).view(torch.uint8)
        points.append((n, time_median(lambda: all_gather_single(recv, send, group=tp.group), tp.device)))
    return fit_linear(points)


def tensor_parallel_profile(tp: TensorParallel, path: Path, measure: Callable[[], Profile], hidden_size: int | None,
                            dtype: torch.dtype) -> Profile:
    """Collective: the group's profile, loaded by rank 0 when it has one, else measured on every rank and
    combined; every rank returns the same profile and saves it at `path`."""
    saved = Profile.load(path) if tp.rank == 0 else None
    text = tp.broadcast_object(saved.to_json() if saved is not None else None)
    if text is not None:
        return Profile.from_json(text)
    local = measure()
    lengths = local.notes.get("lengths") or [256, 1024]
    gather = measure_gather(tp, hidden_size, dtype, lengths) if hidden_size else (0.0, 0.0)
    every: list = [None] * tp.world
    dist.all_gather_object(every, local.to_json(), group=tp.meta_group)
    text = tp.broadcast_object(combine([Profile.from_json(t) for t in every], gather).to_json())
    profile = Profile.from_json(text)
    profile.save(path)
    return profile

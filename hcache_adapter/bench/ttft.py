"""Time to first token as a user sees it: a synchronised `generate(..., max_new_tokens=1)`.

For one model, one context length and one tier, every method serves the same
request (a stored prefix of n tokens plus `suffix` new ones), in rounds: each
round runs every method once, in an order that rotates from round to round,
so that a host whose speed drifts charges all methods alike. Rows:

* recompute     model.generate from tokens
* ideal         model.generate with the prefix K/V already on the GPU (a fresh copy each run)
* hf_offloaded  model.generate over transformers' offloaded cache holding the prefix in host memory
* kv, hcache, auto          hc.generate, state in the tier under test
* hcache-eager-prefill      hc.generate without the captured first forward (what it buys)
* copy floor (H / K/V)      one pinned host-to-device copy of the bytes hcache / kv load (hcache: not
                            layer 0, made from the token embedding where the model allows)

Wall clock with the device synchronised before and after, medians over
repetitions after warm-up.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hcache_adapter.compat import cache_kwarg, fill_layer, new_cache
from hcache_adapter.hcache import HCache

STORED = ("kv", "hcache", "hcache-eager-prefill", "auto")
ALL_METHODS = ("recompute", "ideal", "hf_offloaded", "kv", "hcache", "hcache-eager-prefill", "auto")


@dataclass
class Row:
    model: str
    context: int
    source: str
    method: str
    ttft_ms: float
    spread_ms: float  # (p90 - p10) / 2 over the repetitions
    restore_issue_ms: float = float("nan")  # host time of hc.generate's restore call (lazy: issue only)
    bytes_per_token: int = 0
    restored_tokens: int = 0
    recompute_layers: int = 0
    max_abs_err: float = float("nan")
    repeats: int = 0
    alloc_retries: int = 0  # CUDA caching-allocator retries in the timed runs: each freed the cache and synchronised
    samples: list[float] = field(default_factory=list, repr=False)  # ms per timed round, in round order


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settle_heap() -> None:
    """Collect, then freeze what is left out of the cyclic collector's reach, as a server does once it has
    started (the model, the store's catalog, captured graphs): a collection that traverses them costs
    milliseconds and lands in whichever request allocates next. Measured on the H200 (7B, 4K, this
    bench with the collector off): ideal 47.8 -> 30.1 ms, hcache 41.7 -> 35.4 ms."""
    gc.collect()
    gc.freeze()


def alloc_retries(device: torch.device) -> int:
    """The caching allocator's count of allocations that failed, freed every cached block and tried again. Each
    retry synchronises the device and calls cudaFree, so a run that has one stalls for milliseconds; a count
    above 0 in a row means the process is short of GPU memory, not that the method is slow."""
    if device.type != "cuda":
        return 0
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def prefix_kv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's own K/V for `ids` (the reference a restore must equal, and the "ideal" state)."""
    cache = new_cache(model)
    model.base_model(input_ids=ids, use_cache=True, **{cache_kwarg(model.base_model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def max_error(cache, ref) -> float:
    err = 0.0
    for layer, (k, v) in zip(cache.layers, ref):
        n = k.shape[-2]
        err = max(err, (layer.keys[..., :n, :].float() - k.float()).abs().max().item(),
                  (layer.values[..., :n, :].float() - v.float()).abs().max().item())
    return err


def resident_cache(model, ref):
    """A DynamicCache holding copies of `ref` on the GPU: the state a request finds when nothing is evicted."""
    cache = new_cache(model)
    for l, (k, v) in enumerate(ref):
        fill_layer(cache, l, k.clone(), v.clone())
    return cache


def offloaded_cache(model, ref):
    """transformers' own offloaded DynamicCache, the prefix already moved to pinned host memory."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config, offloading=True)
    for l, (k, v) in enumerate(ref):
        fill_layer(cache, l, k.clone(), v.clone())
        cache.offload(l, only_non_sliding=False)
    cache.prefetch(0)  # as after a previous request: layer 0 on its way back
    return cache


def copy_floor_ms(nbytes: int, device: torch.device, repeat: int = 5) -> float:
    """One pinned host-to-device copy of `nbytes` (the least time loading them can take)."""
    if device.type != "cuda" or nbytes == 0:
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeat + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times[1:])


class Runner:
    """One method's way of serving the request: `setup()` outside the clock, then `run()` timed."""

    def __init__(self, run: Callable[[], object], setup: Callable[[], None] = lambda: None,
                 hc: HCache | None = None):
        self.run, self.setup, self.hc = run, setup, hc


def runners(model, hcs: dict[str, HCache], request: torch.Tensor, ref, source: str, drop: Callable[[str], None],
            methods: list[str]) -> dict[str, Runner]:
    gen = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False)
    kw = cache_kwarg(model)
    out: dict[str, Runner] = {}
    state: dict = {}
    for m in methods:
        if m == "recompute":
            out[m] = Runner(lambda: model.generate(request, **gen))
        elif m == "ideal" and source == "dram":
            out[m] = Runner(lambda: model.generate(request, **gen, **{kw: state.pop("ideal")}),
                            lambda: state.__setitem__("ideal", resident_cache(model, ref)))
        elif m == "hf_offloaded" and source == "dram" and request.is_cuda:
            out[m] = Runner(lambda: model.generate(request, **gen, **{kw: state.pop("off")}),
                            lambda: state.__setitem__("off", offloaded_cache(model, ref)))
        elif m in hcs:
            hc = hcs[m]
            out[m] = Runner(lambda hc=hc: hc.generate(request, **gen),
                            (lambda m=m: drop(m)) if source == "nvme" else (lambda: None), hc)
    return out


def measure_rows(model_name: str, model, hcs: dict[str, HCache], request: torch.Tensor, n: int, source: str,
                 drop: Callable[[str], None], methods: list[str], *, repeat: int, warmup: int,
                 progress: Callable[[], None] = lambda: None) -> list[Row]:
    """The request served by every method, interleaved in rounds; one row per method."""
    device = request.device
    ref = prefix_kv(model, request[:, :n])
    run = runners(model, hcs, request, ref, source, drop, methods)
    order = list(run)
    samples: dict[str, list[float]] = {m: [] for m in order}
    issue: dict[str, list[float]] = {m: [] for m in order}
    retries = dict.fromkeys(order, 0)
    for r in range(warmup + repeat):
        if r == warmup:
            settle_heap()
        k = r % len(order)
        for m in order[k:] + order[:k]:
            runner = run[m]
            runner.setup()
            before = alloc_retries(device)
            t = timed(runner.run, device)
            if r >= warmup:
                samples[m].append(t * 1e3)
                retries[m] += alloc_retries(device) - before
                if runner.hc is not None:
                    issue[m].append(runner.hc.last_restore.seconds * 1e3)
            progress()
    rows = []
    for m in order:
        xs = samples[m]
        row = Row(model_name, n, source, m, statistics.median(xs), _spread(xs), repeats=len(xs), samples=xs,
                  alloc_retries=retries[m])
        hc = run[m].hc
        if hc is not None:
            info = hc.last_restore
            row.restore_issue_ms = statistics.median(issue[m])
            row.bytes_per_token = hc.bytes_per_token()
            row.restored_tokens, row.recompute_layers = info.tokens, info.recompute_layers
            if source == "nvme":
                drop(m)
            restored = hc.restore(request)
            if restored.tokens:
                row.max_abs_err = max_error(restored.cache, ref)
        elif m in ("ideal", "hf_offloaded"):
            row.restored_tokens = n
            row.bytes_per_token = sum(k[0, :, :1].numel() * k.element_size() * 2 for k, _ in ref)
        rows.append(row)
    return rows


def _spread(xs: list[float]) -> float:
    if len(xs) < 3:
        return 0.0
    q = statistics.quantiles(sorted(xs), n=10)
    return (q[-1] - q[0]) / 2

"""Measure a `Profile` on this machine for one model: a few seconds, once per machine and model.

Figures come from the real paths: tier bandwidth through the store's own reads
(memory tiers: a copy into the compute device; NVMe: get_many_into with DRAM
copies dropped), projection time through the model's projector, and per-layer
recomputation time through a forward pass from tokens. GPU work is timed with
CUDA events, medians over repetitions.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Callable

import torch

from hcache_adapter.compat import new_cache
from hcache_adapter.layout import StateLayout
from hcache_adapter.loader import LayerLoader, LayerRead
from hcache_adapter.manifest import HIDDEN, KV
from hcache_adapter.recompute import Recomputer
from hcache_adapter.scheduler.profile import Profile, fit_linear, fit_quadratic
from hstore.buffers import aligned_empty, cuda_available

log = logging.getLogger(__name__)


def time_median(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _lengths(model: torch.nn.Module, device: torch.device) -> list[int]:
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    # 8K on a GPU: a quadratic through 256/1024/4096 alone put a 16K layer's recomputation at 0.9x-1.7x what
    # it took on the lent H200 (auto corrects it from what it measures, but plans its first split on it)
    candidates = (256, 1024, 4096, 8192) if device.type == "cuda" else (64, 256, 512)
    return [n for n in candidates if n <= limit] or [min(64, limit)]


@torch.no_grad()
def measure_profile(store, layout: StateLayout, projector, recomputer: Recomputer, device: torch.device, *,
                    probe_bytes: int | None = None) -> Profile:
    """Profile this machine for one model (bandwidth per tier, projection and recompute cost)."""
    device, dtype = torch.device(device), layout.dtype
    model = recomputer.model
    probe_bytes = probe_bytes or ((256 << 20) if device.type == "cuda" else (32 << 20))
    layer = 0
    hidden_bpt = layout.bytes_per_token(layer, HIDDEN) if projector is not None else 0
    kv_bpt = layout.bytes_per_token(layer, KV)
    read_bw = {"dram": _memory_bandwidth(device, probe_bytes)}
    if device.type == "cuda":
        read_bw["gpu"] = _device_copy_bandwidth(device, probe_bytes)
    if store.tier("nvme") is not None:
        read_bw["nvme"] = _nvme_bandwidth(store, layout, projector is not None, device,
                                          min(probe_bytes, store.config.dram_bytes // 2))
    lengths = _lengths(model, device)
    proj_points, rec_points = [], []
    vocab = model.config.vocab_size
    for n in lengths:
        ids = torch.randint(0, vocab, (1, n), device=device)
        if projector is not None:
            hidden = torch.randn(1, n, projector.hidden_size, device=device, dtype=dtype)
            pos = torch.arange(n, device=device).unsqueeze(0)
            proj_points.append((n, time_median(lambda: projector.project(layer, hidden, pos), device)))
        t = time_median(lambda: recomputer.prefix(ids, recomputer.num_layers, new_cache(model)), device, repeat=3)
        rec_points.append((n, t / recomputer.num_layers))
    host = _host_costs(store, layout, projector, recomputer, device, read_bw.get("gpu", 0.0))
    profile = Profile(
        n_layers=recomputer.num_layers,
        hidden_bytes_per_token=hidden_bpt,
        kv_bytes_per_token=kv_bpt,
        read_bytes_per_s=read_bw,
        project_coef=fit_linear(proj_points) if proj_points else (float("inf"), 0.0),
        recompute_coef=fit_quadratic(rec_points),
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        notes={"lengths": lengths, "projection_s": proj_points, "recompute_layer_s": rec_points},
        **host,
    )
    log.info("measured profile: %s", profile.to_json())
    return profile


def _host_median(fn: Callable[[], object], repeat: int = 5) -> float:
    """Median host seconds to issue `fn` (no device sync inside the timed span)."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _host_costs(store, layout: StateLayout, projector, recomputer: Recomputer, device: torch.device,
                device_copy_bw: float) -> dict[str, float]:
    """What a restore and a first forward cost the host on a GPU (launch-bound hosts make these matter).

    Per chunk key: a memory-tier read of real-sized chunks into the device. Per
    layer: issuing one projection. The eager forward: issuing a forward of 32
    tokens over a short cache. The replayed forward: the weights read once
    (what a graphed forward of a few tokens costs the GPU).
    """
    if device.type != "cuda":
        return {}
    model = recomputer.model
    kind = HIDDEN if projector is not None else KV
    shape = layout.chunk_shape(0, kind)
    chunk = torch.zeros(shape, dtype=layout.dtype)
    dram = store.tier("dram")
    n_keys = max(8, min(128, (dram.capacity - dram.used) // 8 // max(dram.footprint(
        chunk.numel() * chunk.element_size()), 1)))
    keys = [f"__hcache_profile__/host/{i}" for i in range(n_keys)]
    out = torch.empty((n_keys, *shape), dtype=layout.dtype, device=device)
    try:
        store.put_many([(k, chunk) for k in keys])
        key_s = _host_median(lambda: store.get_many_into(keys, out, non_blocking=True, promote=False)) / n_keys
    finally:
        for k in keys:
            store.delete(k)
    layer_s = 0.0
    if projector is not None:
        hidden = torch.zeros(1, layout.chunk_tokens, projector.hidden_size, dtype=layout.dtype, device=device)
        pos = torch.arange(layout.chunk_tokens, device=device).unsqueeze(0)
        layer_s = _host_median(lambda: projector.project(0, hidden, pos))
    ids = torch.randint(0, model.config.vocab_size, (1, 96), device=device)
    cache = recomputer.prefix(ids[:, :64], recomputer.num_layers)

    def forward():
        model(ids[:, 64:], use_cache=True, logits_to_keep=1, **{recomputer.cache_kwarg: cache})
        cache.crop(-32)

    forward_s = _host_median(forward)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    captured_s = weights / (2 * device_copy_bw) if device_copy_bw > 0 else 0.0  # a copy's rate counts both ends
    torch.cuda.synchronize(device)
    return {"host_key_s": key_s, "host_layer_s": layer_s, "forward_host_s": forward_s,
            "captured_forward_s": captured_s}


def _memory_bandwidth(device: torch.device, nbytes: int) -> float:
    """Host DRAM (pinned where CUDA exists) to the compute device."""
    src = aligned_empty(nbytes, pin=cuda_available())
    src.random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / time_median(lambda: dst.copy_(src, non_blocking=True), device)


def _device_copy_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return nbytes / time_median(lambda: dst.copy_(src), device)


def _nvme_bandwidth(store, layout: StateLayout, hidden: bool, device: torch.device, nbytes: int) -> float:
    """Cold reads from the store's NVMe tier to the compute device, through the restore's own loader.

    Layer-sized reads of the model's real chunk size, the loader's parallel
    readers and its staging: the bandwidth a restore sees, which is below what
    one large batched read gets.
    """
    dtype = layout.dtype
    kind = HIDDEN if hidden else KV
    shape = layout.chunk_shape(0, kind)
    chunk = torch.empty(shape, dtype=dtype)
    chunk_bytes = chunk.numel() * chunk.element_size()
    # The probe must not push the user's state out of either tier: a quarter of what is free, at most.
    nvme, dram = store.tier("nvme"), store.tier("dram")
    free_nvme = (nvme.capacity - nvme.used) // 4 // nvme.footprint(chunk_bytes)
    free_dram = (dram.capacity - dram.used) // 4 // dram.footprint(chunk_bytes)
    chunks = max(8, min(nbytes // chunk_bytes, free_nvme, free_dram, 4096))
    per_layer = max(1, min(64, chunks // 8))  # 8 "layers" of up to 64 chunks
    layers = max(2, chunks // per_layer)
    reads = [LayerRead(l, kind, [f"__hcache_profile__/{l}/{c}" for c in range(per_layer)], shape) for l in range(layers)]
    keys = [k for r in reads for k in r.keys]
    try:
        store.put_many([(k, chunk) for k in keys])
        store.flush()

        def read():
            store.drop_cached(keys)
            loader = LayerLoader(store, reads, dtype, device, depth=layers).start()
            try:
                for i in range(layers):
                    loader.get(i)
                    loader.release(i)
            finally:
                loader.close()

        return len(keys) * chunk_bytes / time_median(read, device, repeat=3)
    finally:
        for k in keys:
            store.delete(k)


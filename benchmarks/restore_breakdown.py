"""Where does a restore's time go? Each stage of the DRAM -> GPU restore alone, then together.

    python benchmarks/restore_breakdown.py [--model llama2-7b] [--context 4096] [--layers N]

Stages (medians of 5, CUDA events): one pinned host-to-device copy of all the
hidden states (the floor), the store's get_many_into of every chunk to the GPU,
the store's bookkeeping alone (CPU time), the projection of every layer from
GPU-resident hidden states, and the full `HCache.restore` (hcache and kv).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time

import torch

from hcache_adapter import HCache
from hcache_adapter.bench import build_model
from hcache_adapter.keys import layer_key
from hcache_adapter.scheduler.profiling import time_median
from hstore import StoreConfig, TieredStore
from hstore.buffers import aligned_empty


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--layers", type=int, default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    model = build_model(args.model, torch.float16, dev, args.layers, args.context + 1024)
    L, D, n = model.config.num_hidden_layers, model.config.hidden_size, args.context
    ids = torch.randint(10, model.config.vocab_size, (1, n + 32), device=dev)
    with tempfile.TemporaryDirectory(dir="/tmp") as root, TieredStore(
        StoreConfig(root=root, dram_bytes=12 << 30, nvme_bytes=16 << 30, pin_dram=True)
    ) as store:
        hc = HCache(model, store, method="hcache")
        kv = HCache(model, store, method="kv", namespace="kv")
        t0 = time.perf_counter()
        hc.save(ids[:, :n])
        torch.cuda.synchronize()
        print(f"save (hcache, prefill + {L * n // 64} puts): {1e3 * (time.perf_counter() - t0):.1f} ms wall")
        kv.save(ids[:, :n])
        digests = hc.digests(ids[0, :n])
        keys = [layer_key("hc", d, "h", l) for l in range(L) for d in digests]
        nbytes = L * n * D * 2
        host = aligned_empty(nbytes, pin=True)
        gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        floor = time_median(lambda: gpu.copy_(host, non_blocking=True), dev)
        print(f"floor: one pinned H2D copy of {nbytes / 1e9:.2f} GB: {floor * 1e3:.1f} ms ({nbytes / floor / 1e9:.1f} GB/s)")
        outs = gpu.view(torch.float16).view(L * len(digests), 64, D)  # stacked rows: one per key
        t = time_median(lambda: store.get_many_into(keys, outs, non_blocking=True, promote=False), dev)
        print(f"store.get_many_into of {len(keys)} chunks to the GPU: {t * 1e3:.1f} ms")
        cpu_outs = host.view(torch.float16).view(L * len(digests), 64, D)
        samples = []
        for _ in range(3):
            c0 = time.perf_counter()
            store.get_many_into(keys, cpu_outs, promote=False)
            samples.append(time.perf_counter() - c0)
        print(f"store.get_many_into of {len(keys)} chunks to pinned host (memcpy): {statistics.median(samples) * 1e3:.1f} ms")
        c0 = time.perf_counter()
        store.locate(keys)
        print(f"store.locate of {len(keys)} keys: {(time.perf_counter() - c0) * 1e3:.1f} ms")
        hidden = torch.randn(1, n, D, device=dev, dtype=torch.float16)
        pos = torch.arange(n, device=dev).unsqueeze(0)
        proj = time_median(lambda: [hc.projector.project(l, hidden, pos) for l in range(L)], dev)
        print(f"projection of {L} layers x {n} tokens: {proj * 1e3:.1f} ms")
        project_variants(hc, hidden, pos, dev)
        rest = ids[:, : n + 32]
        for name, h in (("hcache", hc), ("kv", kv)):
            r = time_median(lambda: h.restore(rest), dev, warmup=2)
            print(f"HCache.restore {name}: {r * 1e3:.1f} ms")
        prof = cProfile.Profile()
        prof.enable()
        hc.restore(rest)
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print("CPU of one hcache restore from DRAM (cProfile, own time):\n" + "\n".join(out.getvalue().splitlines()[4:30]))
        nvme_reads(store, hc, keys, digests, L, n, D, dev, rest)


def nvme_reads(store, hc, keys, digests, L, n, D, dev, rest) -> None:
    """The NVMe side: the loader alone (no compute) with 1..8 parallel layer readers, then a restore."""
    from hcache_adapter.loader import LayerLoader, LayerRead

    store.flush()
    nbytes = L * n * D * 2
    reads = [LayerRead(l, "H", keys[l * len(digests):(l + 1) * len(digests)], (64, D)) for l in range(L)]
    for workers in (1, 2, 4, 8):
        LayerLoader.IO_WORKERS = workers
        store.drop_cached()
        t0 = time.perf_counter()
        loader = LayerLoader(store, reads, torch.float16, dev, depth=L).start()
        for i in range(L):
            loader.get(i)
            loader.release(i)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loader.close()
        print(f"loader alone, NVMe -> GPU, {workers} reader(s): {dt * 1e3:.0f} ms, {nbytes / dt / 1e9:.2f} GB/s")
    LayerLoader.IO_WORKERS = 4
    store.drop_cached()
    t0 = time.perf_counter()
    hc.restore(rest)
    torch.cuda.synchronize()
    print(f"HCache.restore hcache from NVMe: {(time.perf_counter() - t0) * 1e3:.0f} ms")


def project_variants(hc, hidden, pos, dev) -> None:
    """CPU cost of issuing one layer's projection (what bounds a pipelined restore) and GPU time, per variant."""
    import hcache_adapter.projection.llama as llama

    proj = hc.projector
    L = proj.num_layers
    cos, sin = proj._cos_sin(hidden, pos)
    variants = {
        "compiled dynamic=True": llama._compiled_llama_kv(),
        "compiled dynamic=False": torch.compile(llama.llama_kv, dynamic=False),
        "eager tensors": llama.llama_kv,
    }
    variants["CUDA graph per layer (replay)"] = lambda: _graphs(proj, L, hidden, cos, sin)
    for name, fn in variants.items():
        try:
            if name.startswith("CUDA graph"):
                fn = fn()

            def run():
                for l in range(L):
                    fn(*proj._args(l, hidden, cos, sin))
            run()
        except Exception as e:  # one variant failing must not hide the others
            print(f"projection {name:>26}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        torch.cuda.synchronize()
        c0 = time.perf_counter()
        run()
        issue = time.perf_counter() - c0
        torch.cuda.synchronize()
        gpu = time_median(run, dev)
        print(f"projection {name:>26}: issue {issue / L * 1e6:7.1f} us/layer on the CPU, {gpu * 1e3:6.1f} ms GPU for {L} layers")


def _graphs(proj, L, hidden, cos, sin):
    """One captured CUDA graph per layer of the eager projection (static input and rotary tables)."""
    import hcache_adapter.projection.llama as llama

    graphs = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for l in range(L):
            llama.llama_kv(*proj._args(l, hidden, cos, sin))  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    for l in range(L):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            llama.llama_kv(*proj._args(l, hidden, cos, sin))
        graphs.append(g)

    def replay(*args):
        layer = replay.calls % L
        replay.calls += 1
        graphs[layer].replay()

    replay.calls = 0
    return replay


if __name__ == "__main__":
    main()

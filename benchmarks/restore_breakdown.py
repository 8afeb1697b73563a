"""Where does a restore's time go? Each stage of the DRAM -> GPU restore alone, then together.

    python benchmarks/restore_breakdown.py [--model llama2-7b] [--context 4096] [--layers N]

Stages (medians of 5, CUDA events): one pinned host-to-device copy of all the
hidden states (the floor), the store's get_many_into of every chunk to the GPU,
the store's bookkeeping alone (CPU time), the projection of every layer from
GPU-resident hidden states, and the full `HCache.restore` (hcache and kv).
"""
from __future__ import annotations

import argparse
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
        StoreConfig(root=root, dram_bytes=12 << 30, nvme_bytes=0, pin_dram=True)
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
            r = time_median(lambda: h.restore(rest), dev)
            print(f"HCache.restore {name}: {r * 1e3:.1f} ms")
        import torch.profiler as tp

        with tp.profile(activities=[tp.ProfilerActivity.CPU, tp.ProfilerActivity.CUDA]) as prof:
            hc.restore(rest)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


def project_variants(hc, hidden, pos, dev) -> None:
    """CPU cost of issuing one layer's projection (what bounds a pipelined restore) and GPU time, per variant."""
    import hcache_adapter.projection.llama as llama

    proj = hc.projector
    L = proj.num_layers
    cos, sin = proj._cos_sin(hidden, pos)
    variants = {
        "compiled dynamic=True": llama._compiled_llama_kv(),
        "compiled mark_dynamic(T)": torch.compile(llama.llama_kv),
        "eager tensors": llama.llama_kv,
    }
    for name, fn in variants.items():
        def run():
            h = hidden
            if name.startswith("compiled mark"):
                torch._dynamo.mark_dynamic(h, 1)
            for l in range(L):
                fn(*proj._args(l, h, cos, sin))
        run()
        torch.cuda.synchronize()
        c0 = time.perf_counter()
        run()
        issue = time.perf_counter() - c0
        torch.cuda.synchronize()
        gpu = time_median(run, dev)
        print(f"projection {name:>26}: issue {issue / L * 1e6:7.1f} us/layer on the CPU, {gpu * 1e3:6.1f} ms GPU for {L} layers")


if __name__ == "__main__":
    main()

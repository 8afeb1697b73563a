"""Two experiments behind design choices of the restore path (run on the GPU machine).

projection  the GPU time of projecting all 32 layers of the Llama-2-7B shape (4096 tokens) when each
            layer is replayed from a CUDA graph, for the kernels the graph can hold: the torch.compile'd
            function with dynamic shapes, compiled for the static shape, and the eager ops (a graph takes
            the launch cost away, so eager kernels are only as slow as they run).
split       TTFT through hc.generate with the state on NVMe and the first r layers recomputed, for a
            range of r: where the bubble-free split really lands on this disk, against recompute.

    python3 benchmarks/restore_experiments.py projection split --models llama2-7b,llama3-8b
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hcache_adapter import HCache
from hcache_adapter.bench.models import build_model
from hcache_adapter.projection import llama
from hcache_adapter.projection.base import modeling_function
from hcache_adapter.scheduler.auto import SplitDecision
from hstore import StoreConfig, TieredStore


def projection(n: int = 4096) -> None:
    model = build_model("llama2-7b", dtype=torch.float16, device="cuda", max_positions=n + 64)
    layers = model.model.layers
    hidden = torch.randn(1, n, 4096, device="cuda", dtype=torch.float16)
    pos = torch.arange(n, device="cuda").unsqueeze(0)
    cos, sin = model.model.rotary_emb(hidden, pos)
    rotate_half = modeling_function(layers[0].self_attn, "rotate_half")

    def args(layer):
        a = layer.self_attn
        return (hidden, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, "llama",
                a.k_proj.weight, None, a.v_proj.weight, None, None, 0.0, cos, sin, 128, rotate_half)

    variants = {
        "compiled, dynamic shapes": torch.compile(llama.llama_kv, dynamic=True),
        "compiled, static shape": torch.compile(llama.llama_kv, dynamic=False),
        "eager ops": llama.llama_kv,
    }
    print(f"\nprojection of 32 layers x {n} tokens (7B shape, fp16), each layer one replayed CUDA graph:")
    for name, fn in variants.items():
        t0 = time.perf_counter()
        graphs = []
        for layer in layers:
            a = args(layer)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*a)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(*a)
            graphs.append(g)
        setup = time.perf_counter() - t0
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for g in graphs:
                g.replay()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        print(f"  {name:28s} GPU {statistics.median(times[2:]):6.2f} ms   (compile + capture {setup:.1f} s)")
        del graphs
    del model
    torch.cuda.empty_cache()


def split(models: list[str], n: int = 4096, suffix: int = 32, reps: int = 4) -> None:
    for name in models:
        model = build_model(name, dtype=torch.float16, device="cuda", max_positions=n + 1024)
        L = model.config.num_hidden_layers
        with TieredStore(StoreConfig(root="/tmp/hc-split", dram_bytes=8 << 30, nvme_bytes=12 << 30)) as store:
            hc = HCache(model, store, method="auto")
            plan = hc.save_plan()
            ids = torch.randint(10, model.config.vocab_size, (1, n + suffix), device="cuda")
            hc.save(ids[:, : n + 1])
            store.flush()
            gen = dict(max_new_tokens=1, do_sample=False)
            forced = {"r": 0}
            hc.scheduler.split = lambda *a, **k: SplitDecision(forced["r"])  # the experiment picks r
            rows = []
            for r in [0, 8, 16, 20, 22, 24, 26, 28, 30, 32]:
                forced["r"] = r
                xs = []
                for i in range(reps + 1):
                    store.drop_cached([k for k in store.keys() if k.startswith(b"hc/")])
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    hc.generate(ids, **gen)
                    torch.cuda.synchronize()
                    if i:
                        xs.append((time.perf_counter() - t0) * 1e3)
                rows.append((r, statistics.median(xs)))
            rec = []
            for i in range(reps + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, **gen)
                torch.cuda.synchronize()
                if i:
                    rec.append((time.perf_counter() - t0) * 1e3)
            recompute = statistics.median(rec)
            print(f"\n{name} ({plan[:4]}... saved), {n} tokens on NVMe + {suffix} new; recompute {recompute:.1f} ms")
            print("  recomputed layers | TTFT ms | vs recompute")
            for r, t in rows:
                print(f"  {r:17d} | {t:7.1f} | {recompute / t:.2f}x")
            print(f"  profile: nvme {hc.profile.read_bytes_per_s.get('nvme', 0) / 1e9:.2f} GB/s, "
                  f"recompute/layer at {n}: {hc.profile.recompute_seconds(n) * 1e3:.2f} ms")
        del model, hc
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="+", choices=("projection", "split"))
    p.add_argument("--models", default="llama2-7b,llama3-8b")
    p.add_argument("--context", type=int, default=4096)
    args = p.parse_args()
    if "projection" in args.what:
        projection(args.context)
    if "split" in args.what:
        split(args.models.split(","), args.context)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

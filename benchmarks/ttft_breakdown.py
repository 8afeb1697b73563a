"""Where the time to first token goes, stage by stage: host (CPU) issue time against GPU time.

For one model shape and context, with the state in DRAM, per method (hcache, kv):

  restore issue      host time of `hc.restore(lazy=True)`: planning, store reads queued, projections queued
  restore done       the same call plus a device sync: when the restored K/V are all on the GPU
  copy floor         one pinned host-to-device copy of the bytes the method loads
  projection         every layer's projection alone (graph replay when captured), GPU time by events
  prefill (eager)    the model's own forward of the new tokens over the restored cache: host, GPU
  prefill (graph)    the same forward replayed by the captured prefill: host, GPU
  TTFT               hc.generate(max_new_tokens=1), captured prefill on and off

and a cProfile of one restore issue (the host's top functions). Run on the GPU machine:

    python3 benchmarks/ttft_breakdown.py --model llama2-7b --context 4096
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from hcache_adapter import HCache
from hcache_adapter.bench.models import add_request_arguments, build_model, shape_label
from hcache_adapter.bench.ttft import copy_floor_ms, sync
from hcache_adapter.compat import cache_kwarg
from hstore import StoreConfig, TieredStore


def host_and_gpu(fn, device, repeat=5):
    """(median host ms to issue, median GPU ms by events on the current stream) of `fn`."""
    host, gpu = [], []
    for i in range(repeat + 1):
        sync(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        b.record()
        b.synchronize()
        if i:
            host.append((t1 - t0) * 1e3)
            gpu.append(a.elapsed_time(b))
    return statistics.median(host), statistics.median(gpu)


def wall(fn, device, repeat=5):
    xs = []
    for i in range(repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i:
            xs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(p)
    p.add_argument("--methods", default="hcache,kv")
    p.add_argument("--root", default="/tmp/hcache-breakdown")
    p.add_argument("--profile-top", type=int, default=25)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    model = build_model(args.model, dtype=torch.float16, device=device, layers=args.layers,
                        max_positions=args.context + 1024)
    print(f"{args.model}: {shape_label(model)}; {args.context} tokens stored + {args.suffix} new; state in DRAM")
    n = args.context
    request = torch.randint(10, model.config.vocab_size, (1, n + args.suffix), device=device)
    kw = cache_kwarg(model)
    with TieredStore(StoreConfig(root=args.root, dram_bytes=24 << 30, nvme_bytes=0, pin_dram=True)) as store:
        for method in args.methods.split(","):
            hc = HCache(model, store, method=method, namespace=method)
            plain = HCache(model, store, method=method, namespace=method, captured_prefill=False)
            hc.save(request[:, : n + 1])
            gen = dict(max_new_tokens=1, do_sample=False)
            for _ in range(3):  # warm up: compile, capture the projection and prefill graphs
                hc.generate(request, **gen)
                plain.generate(request, **gen)
            rows = []

            def issue():
                hc.restore(request, lazy=True).close()

            def issue_only():
                r = hc.restore(request, lazy=True)
                t = (time.perf_counter() - t_start[0]) * 1e3
                r.cache.materialize()
                r.close()
                return t

            t_start = [0.0]
            issue_ms = []
            for _ in range(6):
                sync(device)
                t_start[0] = time.perf_counter()
                issue_ms.append(issue_only())
            rows.append(("restore issue (host)", statistics.median(issue_ms[1:]), float("nan")))
            rows.append(("restore done (wall, synced)", wall(lambda: hc.restore(request, lazy=True).cache.materialize(),
                                                              device), float("nan")))
            rows.append(("copy floor", float("nan"), copy_floor_ms(hc.bytes_per_token() * n, device)))
            if method == "hcache" and hc.projector is not None:
                hidden = torch.randn(1, n, model.config.hidden_size, device=device, dtype=torch.float16)
                pos = torch.arange(n, device=device).unsqueeze(0)
                for _ in range(2):
                    for l in range(hc.num_layers):
                        hc.projector.project_prefix(l, hidden, pos)
                h, g = host_and_gpu(lambda: [hc.projector.project_prefix(l, hidden, pos) for l in range(hc.num_layers)],
                                    device)
                rows.append(("projection, all layers", h, g))

            def eager_prefill():
                r = hc.restore(request, lazy=False)
                sync(device)
                return r

            restored = [eager_prefill()]

            def prefill():
                cache = restored[0].cache
                with torch.no_grad():
                    model(request[:, n:], use_cache=True, logits_to_keep=1, **{kw: cache})
                cache.crop(-args.suffix)

            h, g = host_and_gpu(prefill, device)
            rows.append(("prefill of the new tokens (eager)", h, g))
            rows.append(("TTFT hc.generate, captured prefill", wall(lambda: hc.generate(request, **gen), device), float("nan")))
            rows.append(("TTFT hc.generate, eager prefill", wall(lambda: plain.generate(request, **gen), device), float("nan")))
            rows.append(("TTFT model.generate (recompute)", wall(lambda: model.generate(request, **gen), device), float("nan")))
            print(f"\n{method}: {hc.bytes_per_token():,} bytes/token; prefill replays {hc.prefill.replays if hc.prefill else 0}")
            print(f"| stage | host ms | GPU ms |\n|---|---|---|")
            for name, h, g in rows:
                print(f"| {name} | {h:.2f} | {g:.2f} |".replace("nan", "-"))
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(3):
                issue()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.profile_top)
            print(f"\ncProfile of 3 restore issues ({method}), by own time:\n" + "\n".join(
                line for line in s.getvalue().splitlines() if line.strip())[:6000])
            for k in [k for k in store.keys() if k.startswith(method.encode() + b"/")]:
                store.delete(k)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

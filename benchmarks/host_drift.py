"""Does a process that has served HCache restores run eager forwards slower? (the bench's "ideal" question)

`hcache bench` has measured the eager "ideal" row (`model.generate` over a resident
cache, launch-bound) at ~40-48 ms for the 7B shape at 4K where `ttft_timeline.py`,
minutes earlier on the same lease, measured ~28-29 ms. This script tells a host that
slowed down from a process that slowed down: one process, the same probe after each
step of what the bench does (the profile measured, three HCaches saving, their
captures at 4K, then at 1K, the heap frozen). The probe: "ideal" at 4K (median of
7), the host's time per kernel launch (2,000 small adds), and a pure-Python loop.

    python3 benchmarks/host_drift.py --model llama2-7b
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from hcache_adapter import HCache
from hcache_adapter.bench.models import build_model, shape_label
from hcache_adapter.bench.ttft import prefix_kv, resident_cache, settle_heap, sync
from hcache_adapter.compat import cache_kwarg
from hstore import StoreConfig, TieredStore

GEN = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False)


def timed_ms(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def probe(model, request, ref, device, repeat: int) -> tuple[float, float, float]:
    kw = cache_kwarg(model)
    ideal = [timed_ms(lambda: model.generate(request, **GEN, **{kw: resident_cache(model, ref)}), device)
             for _ in range(repeat)]
    x = torch.zeros(16, device=device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(2000):
        x.add_(1)
    launch_us = (time.perf_counter() - t0) / 2000 * 1e6
    sync(device)
    t0 = time.perf_counter()
    sum(i * i for i in range(300_000))
    python_ms = (time.perf_counter() - t0) * 1e3
    return statistics.median(ideal), launch_us, python_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--root", default="/tmp/hcache-drift")
    p.add_argument("--dram-gib", type=int, default=24)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    model = build_model(args.model, dtype=dtype, device=device, max_positions=args.context + 1024)
    print(f"{args.model}: {shape_label(model)}; {torch.cuda.get_device_name() if cuda else 'CPU'}")
    n = args.context
    request = torch.randint(10, model.config.vocab_size, (1, n + 32), device=device)
    short = torch.randint(10, model.config.vocab_size, (1, 1024 + 32), device=device)
    ref = prefix_kv(model, request[:, :n])
    print("\n| after | ideal 4K ms | launch us | python ms |\n|---|---|---|---|")

    def row(what: str) -> None:
        ideal, launch, py = probe(model, request, ref, device, args.repeat)
        print(f"| {what} | {ideal:.1f} | {launch:.1f} | {py:.1f} |", flush=True)

    row("model built")
    row("again")
    cfg = StoreConfig(root=args.root, dram_bytes=args.dram_gib << 30, nvme_bytes=0, pin_dram=cuda)
    with TieredStore(cfg) as store:
        row("store opened (pinned DRAM)")
        hcs = {m: HCache(model, store, method=m, namespace=m) for m in ("kv", "hcache", "auto")}
        hcs["auto"].profile
        row("HCaches made, auto's profile measured")
        for hc in hcs.values():
            hc.save(request[:, : n + 1])
        store.flush()
        row("4K saved by each")
        for _ in range(5):
            for hc in hcs.values():
                hc.generate(request, **GEN)
        row("5 hc.generate each at 4K")
        for hc in hcs.values():
            hc.save(short[:, :1025])
        for _ in range(5):
            for hc in hcs.values():
                hc.generate(short, **GEN)
        row("5 hc.generate each at 1K")
        settle_heap()
        row("gc.collect + gc.freeze")
        row("again")
        t = {m: statistics.median(timed_ms(lambda hc=hc: hc.generate(request, **GEN), device) for _ in range(args.repeat))
             for m, hc in hcs.items()}
        print("\nhc.generate at 4K now: " + ", ".join(f"{m} {v:.1f} ms" for m, v in t.items()))
        del hcs
    gc.collect()
    row("store closed, HCaches dropped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

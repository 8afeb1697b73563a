"""What Python's cyclic garbage collector costs a process holding a large hstore catalog.

Each stored value is a few tracked objects (its entry, its copies, their locations), and a
full collection traverses all of them: a request that happens to trigger one waits for it.
This fills a DRAM-only store with `--entries` small values and times `gc.collect()` before,
after, and after `gc.freeze()` (what a server does once it has started; `hcache bench` does it
after its warm-up).

    python3 benchmarks/gc_catalog.py --entries 200000
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time


def collect_ms(repeat: int = 3) -> float:
    xs = []
    for _ in range(repeat):
        t = time.perf_counter()
        gc.collect()
        xs.append((time.perf_counter() - t) * 1e3)
    return statistics.median(xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=200_000)
    args = p.parse_args(argv)
    import torch

    from hstore import StoreConfig, TieredStore

    with tempfile.TemporaryDirectory() as root:
        with TieredStore(StoreConfig(root=root, dram_bytes=max(64 << 20, args.entries * 8192), nvme_bytes=0)) as store:
            before, objects = collect_ms(), len(gc.get_objects())
            value = torch.zeros(16)
            for b in range(0, args.entries, 1000):
                store.put_many([(f"k{b}/{i}", value) for i in range(min(1000, args.entries - b))])
            full, grown = collect_ms(), len(gc.get_objects()) - objects
            gc.freeze()
            frozen = collect_ms()
            gc.unfreeze()
    print(f"empty store: a full collection takes {before:.1f} ms ({objects:,} tracked objects)")
    print(f"{args.entries:,} entries: {full:.1f} ms (+{grown:,} tracked objects, {grown / args.entries:.1f} per entry)")
    print(f"after gc.freeze(): {frozen:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Host time per key of the restore hot path: `get_many_into` from a memory tier, a lease, and `locate`.

    python benchmarks/hstore_read_overhead.py [--repo DIR] [--layers 32] [--chunks 64] [--json]

HCache restores a 4K-token prefix as 32 layers x 64 chunk keys: per layer one
`store.locate(keys)` and one `store.get_many_into(keys, stacked_out, non_blocking=True,
promote=False)`; since the sixth session one `store.lease` per ~512 keys (`--lease-keys`) and
one `read_into` per layer instead. The items here are tiny so the copy does not dominate: what is left is
the store's per-key bookkeeping (key lookup, choosing the copy, pins, policy, counters).
Two item sizes: 4 KiB items lie back to back in the arena (one copy per layer, like real
chunks put together), 1 KiB items each take a 4 KiB slot (one copy per key). Medians of
`--repeat` passes over all layers after a warm-up pass. On a GPU machine `--device cuda`
reads into a GPU tensor (the H200 path: non-blocking copies, deferred unpins).

`--repo DIR` imports hstore from another checkout (e.g. the code before a change) to
compare the two on the same machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def measure(args, item_bytes: int) -> dict:
    import torch

    from hstore import StoreConfig, TieredStore

    elems = item_bytes // 4
    with tempfile.TemporaryDirectory() as root:
        cfg = StoreConfig(root=root, dram_bytes=max(64 << 20, 2 * args.layers * args.chunks * 4096), nvme_bytes=0)
        with TieredStore(cfg) as store:
            keys = [[f"hc/{c:04d}/h/{layer}" for c in range(args.chunks)] for layer in range(args.layers)]
            for layer in range(args.layers):
                store.put_many([(k, torch.full((elems,), float(layer))) for k in keys[layer]])
            out = torch.empty(args.chunks, elems, device=args.device)
            for layer in range(args.layers):  # warm-up, and a check that every read found its key
                assert all(store.get_many_into(keys[layer], out, non_blocking=True, promote=False))
            reads, leased, locates = [], [], []
            per_lease = max(1, args.lease_keys // args.chunks)  # layers per lease, as the restore's loader takes them
            for _ in range(args.repeat):
                t = time.perf_counter()
                for layer in range(args.layers):
                    store.get_many_into(keys[layer], out, non_blocking=True, promote=False)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                reads.append(time.perf_counter() - t)
                t = time.perf_counter()
                for first in range(0, args.layers, per_lease):
                    window = keys[first:first + per_lease]
                    with store.lease([k for ks in window for k in ks]) as lease:
                        for j in range(len(window)):
                            lease.read_into(j * args.chunks, (j + 1) * args.chunks, out, non_blocking=True)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                leased.append(time.perf_counter() - t)
                t = time.perf_counter()
                for layer in range(args.layers):
                    store.locate(keys[layer])
                locates.append(time.perf_counter() - t)
    n = args.layers * args.chunks
    return {"item_bytes": item_bytes, "keys_per_pass": n,
            "get_many_into_us_per_key": round(statistics.median(reads) / n * 1e6, 3),
            "lease_us_per_key": round(statistics.median(leased) / n * 1e6, 3),
            "locate_us_per_key": round(statistics.median(locates) / n * 1e6, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                   help="checkout whose hstore to measure (default: this one)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--lease-keys", type=int, default=512, help="keys per lease (the loader's LEASE_KEYS)")
    p.add_argument("--device", default="cpu", help="where the stacked output lives (cpu, cuda)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    import hstore

    rows = [measure(args, size) for size in (4096, 1024)]
    if args.json:
        print(json.dumps({"hstore": hstore.__file__, "device": args.device, "rows": rows}, indent=2))
        return 0
    print(f"hstore from {Path(hstore.__file__).parent}, output on {args.device}, "
          f"{args.layers} layers x {args.chunks} keys, median of {args.repeat}")
    print(f"{'item':>8}  {'get_many_into us/key':>21}  {'lease + read_into us/key':>25}  {'locate us/key':>14}")
    for r in rows:
        print(f"{r['item_bytes']:>7}B  {r['get_many_into_us_per_key']:>21.2f}  {r['lease_us_per_key']:>25.2f}  "
              f"{r['locate_us_per_key']:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

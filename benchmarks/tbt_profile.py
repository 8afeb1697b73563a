"""Where does saving during decoding cost time? TBT with and without HCache's capture, and a profile.

    python benchmarks/tbt_profile.py [--model llama2-7b] [--context 1024] [--tokens 128]

Median time between tokens (streamer timestamps) for plain `model.generate` and for
`HCache.generate` (hcache method) with the store's NVMe tier on and off, interleaved,
then the top Python functions (cProfile, own time) of one run of each.
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
from hcache_adapter.bench import _TokenStamps, build_model
from hstore import StoreConfig, TieredStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = build_model(args.model, dtype, dev, None if dev.type == "cuda" else 4, args.context + args.tokens + 64)
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    with tempfile.TemporaryDirectory(dir="/tmp") as root:
        stores = {
            "saving (DRAM+NVMe)": TieredStore(StoreConfig(root=f"{root}/a", dram_bytes=4 << 30, nvme_bytes=8 << 30)),
            "saving (DRAM only)": TieredStore(StoreConfig(root=f"{root}/b", dram_bytes=4 << 30, nvme_bytes=0)),
        }
        hcs = {name: HCache(model, s, method="hcache", namespace="tbt") for name, s in stores.items()}

        def run(mode: str) -> float:
            ids = torch.randint(10, model.config.vocab_size, (1, args.context), device=dev)
            stamps = _TokenStamps()
            if mode == "plain":
                model.generate(ids, streamer=stamps, **gen)
            else:
                hcs[mode].generate(ids, streamer=stamps, **gen)
                for k in hcs[mode].store.keys():
                    hcs[mode].store.delete(k)
            return stamps.median_gap_ms()

        modes = ["plain", *hcs]
        for m in modes:
            run(m)  # warm-up
        samples = {m: [] for m in modes}
        for _ in range(args.repeat):
            for m in modes:
                samples[m].append(run(m))
        plain = statistics.median(samples["plain"])
        for m in modes:
            t = statistics.median(samples[m])
            print(f"{m:>20}: TBT {t:.2f} ms  ({100 * (t / plain - 1):+.1f}%)  samples {[round(x, 2) for x in samples[m]]}")
        for m in modes:
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            run(m)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
            print(f"\n--- {m}: {time.perf_counter() - t0:.2f} s under cProfile\n" + "\n".join(out.getvalue().splitlines()[6:22]))
        for s in stores.values():
            s.close()


if __name__ == "__main__":
    main()

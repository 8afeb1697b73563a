"""Host time the saver adds to one decoding step: wrapped `forward`s against registered forward hooks.

A decoding step of a small model on the CPU is mostly host work, like a launch-bound
step on the lent H200, so what the saver's watching costs per step shows here. Steps
of one model over one cache, the three ways interleaved step by step (no saver, the
saver with registered hooks, the saver with wrapped forwards), median per way:

    python3 benchmarks/saver_watch_cost.py [--layers 32] [--steps 600]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a shape of hcache_adapter.bench.models (default: tiny)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default: 32, the 7B's)")
    p.add_argument("--steps", type=int, default=600, help="decoding steps in all (default: 600)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from hcache_adapter import HCache
    from hcache_adapter.bench.models import build_model, shape_label
    from hcache_adapter.capture import StateSaver
    from hcache_adapter.compat import cache_kwarg, new_cache
    from hstore import StoreConfig, TieredStore

    model = build_model(args.model, layers=args.layers)
    ways = {"no saver": None, "registered hooks": False, "wrapped forwards": True}
    times: dict[str, list[float]] = {w: [] for w in ways}
    with TieredStore(StoreConfig(root=tempfile.mkdtemp(), dram_bytes=1 << 28, nvme_bytes=0)) as store, \
            torch.no_grad():
        hc = HCache(model, store, namespace="watch")
        cache = new_cache(model)
        kw = {cache_kwarg(model): cache}
        prompt = torch.randint(10, model.config.vocab_size, (1, 200))
        model(prompt, use_cache=True, **kw)
        token = prompt[:, -1:]
        for step in range(args.steps):
            way = list(ways)[step % len(ways)]
            wrap = ways[way]
            saver = None if wrap is None else StateSaver(
                hc.layout, store, hc.save_plan(), start=0, cache=cache, prefix_digest=None,
                decoder_layers=hc.decoder_layers, embeddings=model.get_input_embeddings(),
                internal=hc.recomputer.internal, wrap_forward=wrap)
            if saver is not None:
                saver.__enter__()
            t = time.perf_counter()
            model(token, use_cache=True, **kw)
            times[way].append(time.perf_counter() - t)
            if saver is not None:
                saver.__exit__(None, None, None)
            if cache.get_seq_length() > 400:
                cache.crop(-200)
    print(f"{args.model}: {shape_label(model)}; one token per step over a 200-400 token cache, "
          f"{args.steps // len(ways)} steps per way, interleaved; median ms per step:")
    base = statistics.median(times["no saver"])
    for way, xs in times.items():
        med = statistics.median(xs)
        print(f"  {way:17s} {med * 1e3:7.3f} ms  ({(med - base) * 1e3:+.3f} ms, {100 * (med / base - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the host's time goes in hc.generate(): a cProfile of calls after warm-up, by own and by total time.

The TTFT timeline (ttft_timeline.py) says which phase holds the host; this says which
functions inside it. One request of `--context` stored tokens + `--suffix` new ones,
state in DRAM, `max_new_tokens=1`. Run on the GPU machine:

    python3 benchmarks/generate_profile.py --model llama2-7b --context 4096 [--calls 5] [--top 30]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from hcache_adapter import HCache
from hcache_adapter.bench.models import add_request_arguments, build_model, shape_label
from hcache_adapter.bench.ttft import settle_heap, sync
from hstore import StoreConfig, TieredStore


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(p)
    p.add_argument("--method", default="hcache")
    p.add_argument("--calls", type=int, default=5, help="profiled calls (after 3 warm-ups)")
    p.add_argument("--top", type=int, default=30, help="functions listed per ordering")
    p.add_argument("--root", default="/tmp/hcache-profile")
    p.add_argument("--dram-gib", type=int, default=24)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(args.model, dtype=torch.float16 if cuda else torch.float32, device=device, layers=args.layers,
                        max_positions=args.context + 1024)
    print(f"{args.model}: {shape_label(model)}; {args.context} tokens stored + {args.suffix} new; {args.method}")
    request = torch.randint(10, model.config.vocab_size, (1, args.context + args.suffix), device=device)
    gen = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False)
    with TieredStore(StoreConfig(root=args.root, dram_bytes=args.dram_gib << 30, nvme_bytes=0, pin_dram=cuda)) as store:
        hc = HCache(model, store, method=args.method)
        hc.save(request[:, : args.context + 1])
        for _ in range(3):
            hc.generate(request, **gen)
        settle_heap()
        sync(device)
        prof = cProfile.Profile()
        for _ in range(args.calls):
            prof.enable()
            hc.generate(request, **gen)
            prof.disable()
            sync(device)
    for order in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(order).print_stats(args.top)
        print(f"\n{args.calls} calls by {order}:\n" + "\n".join(l for l in s.getvalue().splitlines() if l.strip())[:20000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TTFT from NVMe against the number of leading layers recomputed: where the split pays, and what auto picks.

From a disk much slower than the copy engine (the lent H200's virtual disk reads
~1.5 GB/s, a 7B layer's hidden state at 4K is 32 MiB, ~21 ms), loading every layer
loses to recomputation by 5x; recomputing the first r layers while the disk reads the
other L - r balances the two. This script times, through `hc.generate` with the
state evicted to NVMe before each call (methods interleaved in rounds, medians):
recompute, auto (as it decides), and the restore forced to each r of a range, so
the measured best split stands beside auto's choice and the planner's estimate.

    python3 benchmarks/nvme_split.py --model llama2-7b --contexts 4096,16384
"""
from __future__ import annotations

import argparse
import shutil
import statistics

import torch

from hcache_adapter import HCache
from hcache_adapter.bench.decode import keys_with_prefix
from hcache_adapter.bench.models import build_model, shape_label
from hcache_adapter.bench.ttft import settle_heap, timed
from hcache_adapter.scheduler.auto import SplitDecision
from hstore import StoreConfig, TieredStore

GEN = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False)


def forced(model, store, r: int, namespace: str) -> HCache:
    """An HCache whose restores recompute exactly the first r layers (every layer saved as a hidden state)."""
    hc = HCache(model, store, method="auto", plan="H" * model.config.num_hidden_layers, namespace=namespace)
    hc.scheduler.split = lambda *args, **kwargs: SplitDecision(r)  # the split under test, not auto's
    return hc


def print_history(hc: HCache, n_tokens: int) -> None:
    """What auto timed of its requests of `n_tokens` (oldest first; warm-ups included), and whether it counted."""
    hc.splits.timer.collect()
    rows = [o for o in hc.splits.timer.history if o.n_tokens == n_tokens]
    if not rows:
        return
    ms = lambda s: "-" if s is None else f"{s * 1e3:.0f}"  # noqa: E731
    print("\nauto's timed requests, oldest first (recomputed layers: recomputation done / restore done / first "
          "forward's end, ms; its reads from NVMe in GB/s; x: a one-time cost, not learned from):\n")
    for o in rows:
        read = f" @{o.read_bytes / o.read_s / 1e9:.2f}" if o.read_s > 0 else ""
        print(f"  {o.recompute_layers}: {ms(o.recompute_s)} / {ms(o.restore_s)} / {ms(o.answer_s)}{read}"
              f"{'' if o.counted else ' x'}")
    auto = hc.scheduler
    print(f"\nlearned: NVMe efficiency {auto.nvme_efficiency:.2f}; recomputing everything measured "
          f"{ms(auto.baseline(n_tokens))} ms\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--contexts", default="4096,16384", help="stored tokens, comma-separated")
    p.add_argument("--splits", default="24-30", help="recomputed layers to force: a range A-B, a list, or none")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--root", default="/tmp/hcache-nvme-split")
    p.add_argument("--dram-gib", type=int, default=12)
    p.add_argument("--nvme-gib", type=int, default=24)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.splits == "none":
        splits = []
    elif "-" in args.splits:
        a, b = (int(x) for x in args.splits.split("-"))
        splits = list(range(a, b + 1))
    else:
        splits = [int(x) for x in args.splits.split(",")]
    model = build_model(args.model, dtype=dtype, device=device, max_positions=max(contexts) + 1024)
    L = model.config.num_hidden_layers
    print(f"{args.model}: {shape_label(model)}; {torch.cuda.get_device_name() if cuda else 'CPU'}; state on NVMe, "
          f"evicted from DRAM before each call; median of {args.repeat} after {args.warmup}")
    cfg = StoreConfig(root=args.root, dram_bytes=args.dram_gib << 30, nvme_bytes=args.nvme_gib << 30, pin_dram=cuda)
    with TieredStore(cfg) as store:
        auto = HCache(model, store, method="auto", namespace="auto")
        prof = auto.profile
        print(f"profile: NVMe {prof.read_bytes_per_s.get('nvme', 0) / 1e9:.2f} GB/s, DRAM "
              f"{prof.read_bytes_per_s.get('dram', 0) / 1e9:.1f} GB/s; auto saves {auto.save_plan()}")
        for n in contexts:
            request = torch.randint(10, model.config.vocab_size, (1, n + 32), device=device)
            hcs = {"auto": auto, **{f"r={r}": forced(model, store, r, "split") for r in splits if 0 < r < L}}
            auto.save(request[:, : n + 1])
            if splits:
                next(h for m, h in hcs.items() if m != "auto").save(request[:, : n + 1])
            store.flush()
            ns = {m: ("auto" if m == "auto" else "split") for m in hcs}
            runs = {"recompute": lambda: model.generate(request, **GEN)}
            runs.update({m: (lambda hc=hc: hc.generate(request, **GEN)) for m, hc in hcs.items()})
            order = list(runs)
            times = {m: [] for m in order}
            chosen = []
            for rnd in range(args.warmup + args.repeat):
                if rnd == args.warmup:
                    settle_heap()
                k = rnd % len(order)
                for m in order[k:] + order[:k]:
                    if m in ns:
                        store.drop_cached(keys_with_prefix(store, ns[m] + "/"))
                    t = timed(runs[m], device) * 1e3
                    if rnd >= args.warmup:
                        times[m].append(t)
                        if m == "auto":
                            chosen.append(auto.last_restore.recompute_layers)
            rec = statistics.median(times["recompute"])
            print(f"\n### {n} tokens stored (auto recomputed {chosen} layers; its learned NVMe efficiency "
                  f"{auto.scheduler.nvme_efficiency:.2f})\n\n| method | TTFT ms | vs recompute | samples |\n|---|---|---|---|")
            for m in order:
                med = statistics.median(times[m])
                print(f"| {m} | {med:.1f} | {rec / med:.2f}x | {' '.join(f'{x:.0f}' for x in times[m])} |", flush=True)
            print_history(auto, n)
            for key in keys_with_prefix(store, "auto/") + keys_with_prefix(store, "split/"):
                store.delete(key)
    shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a split restore from NVMe spends its time to first token: host stamps and GPU marks per phase.

`nvme_split.py` measured, on the lent H200 (7B), split restores 15-40 ms slower than
the larger of their two halves: recomputing r of L layers (r/L of recompute's time)
and reading the other L - r at the profile's NVMe bandwidth. This script times
`hc.generate(..., max_new_tokens=1)` with the state evicted to NVMe before each call
(as nvme_split.py does; methods interleaved in rounds, medians), stamping the host
clock and, where it means something, a CUDA event on the calling thread's stream:

  lookup             digests, stored prefix, layers located, the split decided
  recompute queued   the leading layers' forward issued (host); done (GPU)
  reads              the first and the last loaded layer read (reader threads' host clock)
  restore returned   the lazy cache handed to generate()
  first forward      generate()'s forward of the new tokens (the captured prefill's replay)
  observer synced    auto learning the restore's time, after it waited for the device

then runs one more call of each method under `torch.cuda.set_sync_debug_mode("warn")`
and prints where the host waited for the device.

    python3 benchmarks/nvme_timeline.py --model llama2-7b --context 4096 --splits 28,30
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
import traceback
import warnings
from collections import Counter

import torch

import nvme_split
import ttft_timeline as tl
from hcache_adapter import HCache
from hcache_adapter.bench.decode import keys_with_prefix
from hcache_adapter.bench.models import build_model, shape_label
from hcache_adapter.bench.ttft import settle_heap, sync
from hcache_adapter.loader import LayerLoader
from hcache_adapter.prefix_source import PrefixSource
from hstore import StoreConfig, TieredStore

GEN = nvme_split.GEN


def host_mark(st: tl.Stamps, name: str, last: bool = False) -> None:
    """A host stamp only (reader threads: an event there would mark the wrong stream)."""
    t = (time.perf_counter() - st.t0) * 1e3
    if last or name not in st.host:
        st.host[name] = t


def instrument_reads(st: tl.Stamps) -> None:
    original = LayerLoader._load

    def load(self, i, read):
        out = original(self, i, read)
        if not self.inline:
            host_mark(st, "first read done")
            host_mark(st, "last read done", last=True)
        return out

    LayerLoader._load = load
    produce = PrefixSource.produce

    def produce_marked(self, layer):
        if layer == self.recompute_layers and self.recompute_layers:
            st.mark("first loaded layer taken")
        if layer == len(self.plan) - 1:
            st.mark("last layer taken")
        return produce(self, layer)

    PrefixSource.produce = produce_marked


def instrument_split(hc: HCache, st: tl.Stamps) -> None:
    tl.wrap(hc.recomputer, "prefix", before=lambda: st.mark("recompute start"),
            after=lambda: st.mark("recompute queued"))


def sync_sites(run) -> Counter:
    """Where `run()` made the host wait for the device: the innermost frames of this repository (and
    transformers') at each synchronising call torch reports."""
    sites: Counter = Counter()
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1]
                  if ("hcache_adapter" in f.filename or "transformers" in f.filename or "hstore" in f.filename)]
        sites[" < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[::-1][:4])] += 1

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = shown
    return sites


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--context", type=int, default=4096, help="stored tokens")
    p.add_argument("--splits", default="28,30", help="recomputed layers to force, comma-separated")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--root", default="/tmp/hcache-nvme-timeline")
    p.add_argument("--dram-gib", type=int, default=12)
    p.add_argument("--nvme-gib", type=int, default=24)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    n = args.context
    model = build_model(args.model, dtype=dtype, device=device, max_positions=n + 1024)
    L = model.config.num_hidden_layers
    print(f"{args.model}: {shape_label(model)}; {torch.cuda.get_device_name() if cuda else 'CPU'}; {n} tokens "
          f"stored + 32 new, on NVMe (evicted from DRAM before each call); median of {args.repeat} after {args.warmup}")
    st = tl.Stamps(cuda)
    tl.instrument_model(model, st)
    tl.instrument_module(st)
    instrument_reads(st)
    if cuda:
        tl.instrument_graphs(st)
    cfg = StoreConfig(root=args.root, dram_bytes=args.dram_gib << 30, nvme_bytes=args.nvme_gib << 30, pin_dram=cuda)
    with TieredStore(cfg) as store:
        request = torch.randint(10, model.config.vocab_size, (1, n + 32), device=device)
        auto = HCache(model, store, method="auto", namespace="auto")
        hcs = {"auto": auto, **{f"r={r}": nvme_split.forced(model, store, int(r), "split")
                                for r in args.splits.split(",") if r and 0 < int(r) < L}}
        auto.save(request[:, : n + 1])
        if len(hcs) > 1:
            hcs[next(m for m in hcs if m != "auto")].save(request[:, : n + 1])
        store.flush()
        for i, hc in enumerate(hcs.values()):
            tl.instrument(hc, st, wrap_store=i == 0)
            instrument_split(hc, st)
        spaces = {m: ("auto/" if m == "auto" else "split/") for m in hcs}
        runs = {"recompute": lambda: model.generate(request, **GEN)}
        runs.update({m: (lambda hc=hc: hc.generate(request, **GEN)) for m, hc in hcs.items()})
        order = list(runs)
        rows = {m: [] for m in order}
        for rnd in range(args.warmup + args.repeat):
            if rnd == args.warmup:
                settle_heap()
            k = rnd % len(order)
            for m in order[k:] + order[:k]:
                if m in spaces:
                    store.drop_cached(keys_with_prefix(store, spaces[m]))
                sync(device)
                st.begin()
                runs[m]()
                st.mark("generate returned")
                sync(device)
                total = (time.perf_counter() - st.t0) * 1e3
                if rnd >= args.warmup:
                    rows[m].append((dict(st.host), st.gpu(), total))
        print(f"\nauto recomputed {auto.last_restore.recompute_layers} layers last; learned NVMe efficiency "
              f"{auto.scheduler.nvme_efficiency:.2f}; profile NVMe "
              f"{auto.profile.read_bytes_per_s.get('nvme', 0) / 1e9:.2f} GB/s")
        ttft = {m: statistics.median(r[2] for r in rows[m]) for m in order}
        print("\n| method | TTFT ms | vs recompute |\n|---|---|---|")
        for m in order:
            print(f"| {m} | {ttft[m]:.1f} | {ttft['recompute'] / ttft[m]:.2f}x |")
        for m in order:
            print(f"\n### {m}: TTFT {ttft[m]:.1f} ms\n\n| phase | host ms | GPU ms |\n|---|---|---|")
            names = sorted({k for r in rows[m] for k in r[0]},
                           key=lambda k: statistics.median(r[0][k] for r in rows[m] if k in r[0]))
            for name in names:
                h = statistics.median(r[0][name] for r in rows[m] if name in r[0])
                gs = [r[1][name] for r in rows[m] if name in r[1]]
                print(f"| {name} | {h:.2f} | {statistics.median(gs):.2f} |" if gs else f"| {name} | {h:.2f} | - |")
        if cuda:
            print("\n### where the host waited for the device (one call each, sync debug mode)\n")
            for m in order:
                if m in spaces:
                    store.drop_cached(keys_with_prefix(store, spaces[m]))
                sync(device)
                st.begin()
                sites = sync_sites(runs[m])
                print(f"- {m}: {sum(sites.values())} synchronising calls")
                for site, count in sites.most_common(8):
                    print(f"  - {count}x {site}")
        for key in keys_with_prefix(store, "auto/") + keys_with_prefix(store, "split/"):
            store.delete(key)
    shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

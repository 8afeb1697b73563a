"""Where one hc.generate() call spends its time to first token: a host timeline with GPU marks.

For one model shape and context with the state in DRAM (store flushed), each method's
`generate(..., max_new_tokens=1)` is run with light wrappers that stamp the host clock
at its phases, and CUDA events that mark when the GPU got there:

  lookup           digests, stored prefix, locate (host)
  restore issue    Restorer.restore: store reads and projections queued (host), split
                   into store reads (get_many_into) and projection calls
  generate setup   from the restore's return to the model's first forward (transformers)
  first forward    the model's forward of the new tokens (captured or eager)
  after            sampling, stopping criteria, the return

with, on the GPU: when the copy stream and the compute stream finished the restore and
when the first forward's work finished. Medians over repetitions; methods interleaved.
Run on the GPU machine:

    python3 benchmarks/ttft_timeline.py --model llama2-7b --context 4096
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
from collections import defaultdict

import torch

from hcache_adapter import HCache
from hcache_adapter import hcache as hcache_module
from hcache_adapter import split_attention
from hcache_adapter.bench.models import add_request_arguments, build_model, shape_label
from hcache_adapter.bench.ttft import alloc_retries, prefix_kv, resident_cache, settle_heap, sync
from hcache_adapter.compat import cache_kwarg
from hcache_adapter.loader import LayerLoader
from hcache_adapter.restore import Restorer
from hstore import StoreConfig, TieredStore
from hstore.lease import ReadLease


class Stamps:
    """Host timestamps (ms since the call began) and GPU events, per phase, for one call."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.t0 = 0.0
        self.host: dict[str, float] = {}
        self.events: dict[str, torch.cuda.Event] = {}
        self.sums: dict[str, float] = defaultdict(float)
        self.start_event = None
        self.in_prefill = False
        self.in_projection = False  # inside project_prefix: its graph replays are not the prefill's
        self.prefill_graphs = []
        self.restorer = None  # the Restorer of the call being timed (its streams time the restore's end)

    def begin(self) -> None:
        self.host.clear(), self.events.clear(), self.sums.clear()
        self.restorer = None
        self.t0 = time.perf_counter()
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()

    def mark(self, name: str, stream=None, last: bool = False) -> None:
        """Stamp `name` the first time it is reached in this call (the last time with `last`)."""
        if last:
            self.host.pop(name, None)
            self.events.pop(name, None)
        self.host.setdefault(name, (time.perf_counter() - self.t0) * 1e3)
        if self.cuda and name not in self.events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream) if stream is not None else ev.record()
            self.events[name] = ev

    def gpu(self) -> dict[str, float]:
        return {k: self.start_event.elapsed_time(e) for k, e in self.events.items()} if self.cuda else {}


def wrap(owner, name: str, before=None, after=None, total: tuple[Stamps, str] | None = None):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if before:
            before()
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if total is not None:
                total[0].sums[total[1]] += (time.perf_counter() - t) * 1e3
            if after:
                after()

    setattr(owner, name, wrapper)


def instrument(hc: HCache, st: Stamps, wrap_store: bool) -> None:
    """Stamp hc's phases (instance attributes and hcache's module functions; nothing else changes)."""
    r = hc.restorer
    wrap(hc, "generate", before=lambda: st.mark("entry"))
    wrap(r, "restore", before=lambda: (st.mark("lookup done"), setattr(st, "restorer", r)),
         after=lambda: st.mark("restore returned"))
    if wrap_store:  # once per store: the instances share it
        wrap(hc.store, "get_many_into", total=(st, "store reads"))
        wrap(hc.store, "lease", total=(st, "store lease"))
        wrap(ReadLease, "read_into", total=(st, "store reads"))
    if hc.projector is not None:  # its graph replays (queued from inside the first forward too) are not the prefill's
        wrap(hc.projector, "project_prefix", total=(st, "projection calls"),
             before=lambda: setattr(st, "in_projection", True), after=lambda: setattr(st, "in_projection", False))
    if hc.prefill is not None:
        def enter():
            st.mark("static copy start")
            st.in_prefill = True
            st.prefill_graphs = []

        def leave():
            st.mark("prefill returned")
            st.in_prefill = False

        wrap(hc.prefill, "_run", before=enter, after=leave)


def instrument_graphs(st: Stamps) -> None:
    """Mark the captured prefill's replay (not the projection's): its start is when the static copies are queued."""
    original = torch.cuda.CUDAGraph.replay

    def replay(graph):
        ours = st.in_prefill and not st.in_projection
        if ours:
            st.mark("prefill replay start")
            st.prefill_graphs.append(graph)
        original(graph)
        if ours:
            st.mark("prefill replay end", last=True)

    torch.cuda.CUDAGraph.replay = replay


def replay_alone(graphs, repeat: int = 5) -> float:
    """GPU ms of one replay of `graphs` (in order) with nothing else running (median)."""
    xs = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for g in graphs:
            g.replay()
        b.record()
        b.synchronize()
        xs.append(a.elapsed_time(b))
    return statistics.median(xs)


def restore_queued(st: Stamps) -> None:
    """The restore's last layer is queued when its loader closes (the first layers before restore() returns,
    the rest as the model takes them): the host's time then, and the GPU's when that work is done."""
    r = st.restorer
    if r is not None:
        st.mark("restore issued", last=True)
        st.mark("restore compute done", r.compute_stream, last=True)
        st.mark("restore copies done", r.copy_stream, last=True)


def instrument_module(st: Stamps) -> None:
    wrap(LayerLoader, "close", after=lambda: restore_queued(st))
    wrap(hcache_module, "stored_prefix", before=lambda: st.mark("digests done"), after=lambda: st.mark("prefix found"))
    wrap(Restorer, "begin", after=lambda: st.mark("early start done"))
    wrap(hcache_module, "locate_layers", after=lambda: st.mark("layers located"))


def instrument_model(model, st: Stamps) -> None:
    model.register_forward_pre_hook(lambda *a: st.mark("first forward start"))
    model.register_forward_hook(lambda *a: st.mark("first forward end"))


def variant(model, store, spec: str) -> HCache:
    """An HCache for a method spec: METHOD[/KEY=VALUE...] with keys seg (layers per captured-prefill graph),
    attn (its attention; "model": the model's own; "pieces": split attention without the Triton kernels), hold (0: do not hold the flusher back), prio (0: replay the
    captured prefill on the current stream, not one of the highest priority), fuse (0: capture the layers'
    norms, MLPs and rotary uncompiled), carve (SMs the projection graphs' GEMMs leave free), look (layers of
    copies queued ahead of the compute; "all": every free slot), heads (1: projection GEMMs per head, in place),
    inplace (1: projection graphs write K/V in place), readslot (0: projection graphs copy the loaded hidden
    state into their input instead of reading it in place), lease (0: read each layer with get_many_into), ahead (MiB
    of a restore queued before the first forward, or "all"; 0: one layer), early (0: no reads started before the lookup
    finished), kv (with METHOD=mix: auto saving the first kv layers as K/V and the rest as hidden states; at=end:
    the last kv layers)."""
    method, *opts = spec.split("/")
    opt = dict(o.split("=", 1) for o in opts)
    kw = dict(namespace=spec.replace("/", "-").replace("=", ""), hold_flusher=opt.get("hold", "1") != "0")
    if method == "mix":
        L, k = model.config.num_hidden_layers, int(opt.get("kv", 0))
        plan = "H" * (L - k) + "K" * k if opt.get("at") == "end" else "K" * k + "H" * (L - k)
        hc = HCache(model, store, method="auto", plan=plan, **kw)
    else:
        hc = HCache(model, store, method=method, **kw)
    if hc.prefill is not None:
        hc.prefill.segment_layers = int(opt.get("seg", hc.prefill.segment_layers))
        hc.prefill.high_priority = opt.get("prio", "1") != "0"
        hc.prefill.compile_blocks = opt.get("fuse", "1") != "0"
        if "attn" in opt and opt["attn"] != "pieces":  # pieces: split attention without the Triton kernels
            hc.prefill.attention = None if opt["attn"] == "model" else opt["attn"]
    if "heads" in opt:  # 1: the projection graphs' GEMMs per head, V written in the cache's layout
        hc.projector.heads_gemm = opt["heads"] != "0"
        hc.projector.write_in_place = hc.projector.write_in_place or hc.projector.heads_gemm
    if "inplace" in opt:  # 1: the projection graphs write K/V into the destination instead of copying them there
        hc.projector.write_in_place = opt["inplace"] != "0"
    if "readslot" in opt:  # 0: the projection graphs copy the loaded hidden state into their input first
        hc.projector.read_in_place = opt["readslot"] != "0"
    if "carve" in opt:  # SMs the projection graphs' GEMMs leave free
        hc.projector.sm_carveout = int(opt["carve"])
    if "look" in opt:  # layers of copies the loader queues ahead of the compute ("all": every free slot)
        hc.restorer.inline_lookahead = None if opt["look"] == "all" else int(opt["look"])
    if "lease" in opt:  # 0: each layer read with get_many_into (every key looked up and pinned per read)
        hc.restorer.lease_reads = opt["lease"] != "0"
    if opt.get("early") == "0":  # the lookup locates every layer before the first read starts
        hc.restorer.early_min_keys = None
    if "ahead" in opt:  # MiB of the restore queued before the first forward ("all": everything)
        hc.restorer.issue_ahead_bytes = 1 << 50 if opt["ahead"] == "all" else max(1, int(opt["ahead"]) << 20)
    return hc


def with_triton_attention(on: bool, fn):
    """fn, run with split attention's Triton kernels on or off (they are chosen when a graph is captured,
    so a variant keeps what it was captured with)."""
    def run():
        before = split_attention.use_triton
        split_attention.use_triton = on
        try:
            return fn()
        finally:
            split_attention.use_triton = before
    return run


class BusyWriter:
    """Puts fresh values in a loop on a thread, so that the store's flusher always has work (other sessions
    saving their state while this request is served)."""

    def __init__(self, store, mib: int):
        self.store, self.mib = store, mib
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        value = torch.ones(self.mib << 18)
        i = 0
        while not self.stop.is_set():
            self.store.put(f"busy/{i % 64}", value)
            i += 1
            self.stop.wait(0.001)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def measure(runs, order, rows, st: Stamps, state, model, ref, device, repeat: int, warmup: int = 3) -> None:
    """Every method once per round, rotated so that drift hits all alike; rounds after `warmup` are kept."""
    for rep in range(warmup + repeat):
        if rep == warmup:
            settle_heap()  # as the bench and a started server do
        k = rep % len(order)
        for m in order[k:] + order[:k]:
            if m == "ideal":
                state["ideal"] = resident_cache(model, ref)
            sync(device)
            before = alloc_retries(device)
            st.begin()
            runs[m]()
            st.mark("generate returned")
            sync(device)
            total = (time.perf_counter() - st.t0) * 1e3
            st.sums["CUDA alloc retries"] += alloc_retries(device) - before
            if rep >= warmup:
                rows[m].append((dict(st.host), st.gpu(), dict(st.sums), total))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(p)
    p.add_argument("--methods", default="ideal,hcache,kv", help="comma-separated: ideal, recompute, or METHOD[/KEY=VALUE...] (see `variant`), e.g. hcache, "
                        "hcache/seg=32/attn=model, hcache/hold=0, hcache/prio=0, mix/kv=8")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--root", default="/tmp/hcache-timeline")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--dram-gib", type=int, default=24)
    p.add_argument("--nvme-gib", type=int, default=0, help="an NVMe tier too (its flusher then runs)")
    p.add_argument("--no-flush", action="store_true", help="measure while the flusher may still be writing")
    p.add_argument("--busy-mib", type=int, default=0,
                   help="keep the flusher busy: a thread puts values of this many MiB in a loop (needs --nvme-gib)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, dtype=dtype, device=device, layers=args.layers, max_positions=args.context + 1024)
    print(f"{args.model}: {shape_label(model)}; {args.context} tokens stored + {args.suffix} new; state in DRAM;"
          f" {torch.cuda.get_device_name() if cuda else 'CPU'}")
    n = args.context
    request = torch.randint(10, model.config.vocab_size, (1, n + args.suffix), device=device)
    gen = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False)
    kw = cache_kwarg(model)
    st = Stamps(cuda)
    instrument_model(model, st)
    instrument_module(st)
    if cuda:
        instrument_graphs(st)
    methods = args.methods.split(",")
    with TieredStore(StoreConfig(root=args.root, dram_bytes=args.dram_gib << 30, nvme_bytes=args.nvme_gib << 30, pin_dram=cuda)) as store:
        runs = {}
        for m in methods:
            if m in ("ideal", "recompute"):
                continue
            # "hcache/32": the captured prefill in graphs of 32 layers; "hcache/4/sdpa": and with that attention
            hc = variant(model, store, m)
            hc.save(request[:, : n + 1])
            instrument(hc, st, wrap_store=not runs)
            runs[m] = with_triton_attention("attn=pieces" not in m, lambda hc=hc: hc.generate(request, **gen))
        if not args.no_flush:
            store.flush()
        ref = prefix_kv(model, request[:, :n])
        state = {}
        if "ideal" in methods:
            runs["ideal"] = lambda: model.generate(request, **gen, **{kw: state.pop("ideal")})
        if "recompute" in methods:
            runs["recompute"] = lambda: model.generate(request, **gen)
        order = [m for m in methods if m in runs]
        rows: dict[str, list[tuple[dict, dict, dict, float]]] = {m: [] for m in order}
        busy = BusyWriter(store, args.busy_mib) if args.busy_mib else contextlib.nullcontext()
        with busy:
            measure(runs, order, rows, st, state, model, ref, device, args.repeat)
        if st.prefill_graphs:
            st.in_prefill = False
            graphs = st.prefill_graphs  # the last call's
            print(f"captured prefill ({len(graphs)} graphs), replayed alone: {replay_alone(graphs):.2f} ms GPU")
    print("\n| method | TTFT ms | vs recompute |\n|---|---|---|")
    ttft = {m: statistics.median(r[3] for r in rows[m]) for m in order}
    for m in order:
        rel = f"{ttft['recompute'] / ttft[m]:.2f}x" if "recompute" in ttft else "-"
        print(f"| {m} | {ttft[m]:.1f} | {rel} |")
    for m in order:
        print(f"\n### {m}: TTFT {statistics.median(r[3] for r in rows[m]):.1f} ms (median of {len(rows[m])})")
        print("| phase | host ms | GPU ms |\n|---|---|---|")
        names = sorted({k for r in rows[m] for k in r[0]}, key=lambda k: statistics.median(r[0].get(k, 0) for r in rows[m]))
        for name in names:
            h = statistics.median(r[0][name] for r in rows[m] if name in r[0])
            gs = [r[1][name] for r in rows[m] if name in r[1]]
            print(f"| {name} | {h:.2f} | {statistics.median(gs):.2f} |" if gs else f"| {name} | {h:.2f} | - |")
        for name in sorted({k for r in rows[m] for k in r[2]}):
            print(f"| (sum) {name} | {statistics.median(r[2].get(name, 0.0) for r in rows[m]):.2f} | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where hc.generate()'s GPU time goes, stream by stream: a kernel trace of one call after warm-up.

The TTFT timeline (ttft_timeline.py) says when each phase ends; this says what the
GPU ran meanwhile. One `hc.generate(max_new_tokens=1)` of `--context` stored tokens
+ `--suffix` new ones (state in DRAM) is traced with the profiler after warm-ups
(the second call captures the first forward's graphs); its kernels and copies are
grouped by CUDA stream: the restore's copy and compute streams, and the captured
forward's stream. Per stream: busy time, first start and last end (ms after the
call's first GPU event), and the top kernels. Then the union of the compute
streams' busy time against the call's span: the idle SM time a faster order
could fill. Run on the GPU machine:

    python3 benchmarks/gpu_streams.py --model llama2-7b --context 4096 [--method hcache] [--top 8] [--copy-out]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from hcache_adapter import HCache
from hcache_adapter.bench.models import add_request_arguments, build_model, shape_label
from hcache_adapter.bench.ttft import settle_heap, sync
from hstore import StoreConfig, TieredStore


def gpu_events(trace: dict) -> list[dict]:
    """The trace's kernels and memory copies/sets: name, stream, start, duration (us)."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            stream = e.get("args", {}).get("stream", e.get("tid"))
            out.append(dict(name=e["name"], cat=e["cat"], stream=stream, ts=float(e["ts"]), dur=float(e["dur"])))
    return out


def union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) spans."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def report(events: list[dict], top: int) -> str:
    if not events:
        return "no GPU events in the trace"
    t0 = min(e["ts"] for e in events)
    t1 = max(e["ts"] + e["dur"] for e in events)
    by_stream: dict[object, list[dict]] = defaultdict(list)
    for e in events:
        by_stream[e["stream"]].append(e)
    lines = [f"call's GPU span: {(t1 - t0) / 1e3:.2f} ms (first to last GPU event)"]
    for stream, evs in sorted(by_stream.items(), key=lambda kv: min(e["ts"] for e in kv[1])):
        kernels = [e for e in evs if e["cat"] == "kernel"]
        copies = [e for e in evs if e["cat"] != "kernel"]
        start = (min(e["ts"] for e in evs) - t0) / 1e3
        end = (max(e["ts"] + e["dur"] for e in evs) - t0) / 1e3
        busy = union_us([(e["ts"], e["ts"] + e["dur"]) for e in evs]) / 1e3
        lines.append(f"\nstream {stream}: {len(kernels)} kernels, {len(copies)} copies; busy {busy:.2f} ms, "
                     f"from {start:.2f} to {end:.2f} ms")
        sums: dict[str, list[float]] = defaultdict(list)
        for e in evs:
            sums[e["name"]].append(e["dur"])
        for name, durs in sorted(sums.items(), key=lambda kv: -sum(kv[1]))[:top]:
            lines.append(f"  {sum(durs) / 1e3:8.3f} ms  x{len(durs):<5d} {name[:100]}")
    kernel_spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["cat"] == "kernel"]
    busy = union_us(kernel_spans) / 1e3
    lines.append(f"\nkernels of all streams: busy {busy:.2f} ms of the {(t1 - t0) / 1e3:.2f} ms span "
                 f"(idle {(t1 - t0) / 1e3 - busy:.2f} ms); sum of kernel times "
                 f"{sum(b - a for a, b in kernel_spans) / 1e3:.2f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(p)
    p.add_argument("--method", default="hcache")
    p.add_argument("--warmup", type=int, default=4,
                   help="calls before the traced one (the second captures; the third and fourth capture the "
                        "projection graphs that write into the captured prefill's cache)")
    p.add_argument("--copy-out", action="store_true",
                   help="projection graphs copy K/V out of their own outputs (`projector.write_in_place = False`, "
                        "the default before the eleventh session)")
    p.add_argument("--top", type=int, default=8, help="kernels listed per stream")
    p.add_argument("--root", default="/tmp/hcache-streams")
    p.add_argument("--dram-gib", type=int, default=24)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU: it traces the GPU's streams")
    device = torch.device("cuda")
    model = build_model(args.model, dtype=torch.float16, device=device, layers=args.layers,
                        max_positions=args.context + 1024)
    print(f"{args.model}: {shape_label(model)}; {args.context} tokens stored + {args.suffix} new; {args.method}; "
          f"{torch.cuda.get_device_name()}")
    request = torch.randint(10, model.config.vocab_size, (1, args.context + args.suffix), device=device)
    gen = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False)
    with TieredStore(StoreConfig(root=args.root, dram_bytes=args.dram_gib << 30, nvme_bytes=0, pin_dram=True)) as store:
        hc = HCache(model, store, method=args.method)
        if args.copy_out and hc.projector is not None:
            hc.projector.write_in_place = False
        hc.save(request[:, : args.context + 1])
        for _ in range(args.warmup):
            hc.generate(request, **gen)
        sync(device)
        settle_heap()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            hc.generate(request, **gen)
            sync(device)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    print(report(gpu_events(trace), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which GPU kernels the first forward over a restored prefix spends its device time in.

generate()'s first forward after a restore (the new tokens over the prefix) should cost
the GPU little more than one read of the weights. This profiles that forward two ways,
the model's own (eager, a DynamicCache holding the prefix) and the captured prefill's
static-shape forward run eagerly (the code its CUDA graph records), and prints the top
kernels by device time with the totals. Run on the GPU machine:

    python3 benchmarks/prefill_kernels.py --model llama2-7b --context 4096
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from hcache_adapter import HCache
from hcache_adapter.bench.models import add_request_arguments, build_model, shape_label
from hcache_adapter.bench.ttft import prefix_kv, resident_cache, sync
from hcache_adapter.compat import cache_kwarg
from hcache_adapter.firstforward import first_forward
from hcache_adapter.prefill_graph import CapturedPrefill
from hstore import StoreConfig, TieredStore


def top_kernels(fn, device, top: int, setup=lambda: None) -> str:
    """The top kernels of `fn(setup())` by device time (one warm-up call first; setup not profiled)."""
    fn(setup())
    sync(device)
    arg = setup()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(arg)
        sync(device)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / 1e3
    events.sort(key=lambda e: -e.self_device_time_total)
    lines = [f"  device total {total:.2f} ms"]
    for e in events[:top]:
        lines.append(f"  {e.self_device_time_total / 1e3:8.2f} ms  x{e.count:<5d} {e.key[:110]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(p)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--root", default="/tmp/hcache-kernels")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model(args.model, dtype=dtype, device=device, layers=args.layers, max_positions=args.context + 1024)
    print(f"{args.model}: {shape_label(model)}; {args.context} tokens restored + {args.suffix} new;"
          f" {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    n = args.context
    request = torch.randint(10, model.config.vocab_size, (1, n + args.suffix), device=device)
    kw = cache_kwarg(model)
    ref = prefix_kv(model, request[:, :n])

    def forward(cache):
        with torch.no_grad():
            model(input_ids=request[:, n:], use_cache=True, logits_to_keep=1, **{kw: cache})

    print("model's own forward over a resident DynamicCache:")
    print(top_kernels(forward, device, args.top, lambda: resident_cache(model, ref)))
    with TieredStore(StoreConfig(root=args.root, dram_bytes=(n * 300_000) + (1 << 30), nvme_bytes=0)) as store:
        hc = HCache(model, store, method="hcache")
        hc.save(request[:, : n + 1])
        prefill = CapturedPrefill(model, hc.decoder_layers, kw, hc.recomputer.internal, capture=False)

        def restored():
            cache = hc.restore(request, lazy=True).cache
            return cache.materialize()

        def static(cache):
            with torch.no_grad(), first_forward(model, prefill.handler(cache, n, None, [])):
                forward(cache)

        print("the captured prefill's static forward run eagerly (what its graph records), restored cache:")
        print(top_kernels(static, device, args.top, restored))
        print(f"  (static forwards run: {prefill.runs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

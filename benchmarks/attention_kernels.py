"""GPU time of the captured first forward's attention: a few new tokens over a long restored prefix.

For each shape (the 7B's 32 heads; the 8B's 32 query heads over 8 K/V heads) and static cache length
(the captured prefill's buckets), times 32 calls (one per layer) captured in one CUDA graph, median of
replays, for: transformers' eager attention (what the captured prefill ran), sdpa with the mask, and
`hcache_adapter.split_attention` with several piece counts, and `flash_decoding`'s Triton kernels; with each one's max error against a float32
reference. Run on the GPU machine:

    python3 benchmarks/attention_kernels.py
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from hcache_adapter import flash_decoding
from hcache_adapter.split_attention import eager_attention, attend, choose_splits


def graph_ms(fn, layers: int, replays: int) -> float:
    """Median GPU ms of `layers` calls of fn, captured as one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(layers):
            fn()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1280,5120,20480,40960", help="static cache lengths (keys)")
    p.add_argument("--queries", type=int, default=32, help="new tokens (queries)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--splits", default="4,8,16,32", help="piece counts to try besides the chosen one")
    p.add_argument("--triton-configs", default="", help="flash_decoding tilings to try besides its own, comma-"
                   "separated BLOCK_N:WARPS:STAGES:BLOCKS (e.g. 64:4:3:264,128:8:3:528)")
    p.add_argument("--padding", type=int, default=0, help="masked cache rows at the end, besides the 2 x queries")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (it times fused kernels)")
    dev, dt = torch.device("cuda"), torch.float16
    print(f"{torch.cuda.get_device_name()}: {args.layers} calls per graph, {args.queries} queries, float16")
    print("| shape | keys | method | GPU ms (all layers) | max abs err vs fp32 |")
    print("|---|---|---|---|---|")
    module = torch.nn.Module().eval()
    for label, H, Hkv in (("7B (32/32 heads)", 32, 32), ("8B (32/8 heads)", 32, 8)):
        for N in (int(x) for x in args.rows.split(",")):
            M, D = args.queries, 128
            q = torch.randn(1, H, M, D, device=dev, dtype=dt)
            k = torch.randn(1, Hkv, N, D, device=dev, dtype=dt)
            v = torch.randn(1, Hkv, N, D, device=dev, dtype=dt)
            n = N - 2 * M - args.padding  # real prefix rows; the rest padding, as in a bucket
            pos = torch.arange(M, device=dev) + n
            mask = (torch.arange(N, device=dev).view(1, 1, 1, N) > pos.view(1, 1, M, 1)).to(dt) * torch.finfo(dt).min
            scale = D ** -0.5
            ref = eager_attention(module, q.float(), k.float(), v.float(), mask.float(), scale, 0.0)[0]
            methods = {"eager": lambda: eager_attention(module, q, k, v, mask, scale, 0.0)[0],
                       "sdpa": lambda: F.scaled_dot_product_attention(
                           q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), attn_mask=mask,
                           scale=scale).transpose(1, 2)}
            chosen = choose_splits(N, Hkv, M * (H // Hkv))
            for s in sorted({chosen, *(int(x) for x in args.splits.split(","))}):
                if N % s == 0:
                    methods[f"split {s}" + (" (chosen)" if s == chosen else "")] = (
                        lambda s=s: attend(q, k, v, mask, scale, s).transpose(1, 2))
            if flash_decoding.available(q):
                methods["triton (flash_decoding)"] = lambda: flash_decoding.attend(q, k, v, mask[0, 0], scale)
                for cfg in filter(None, args.triton_configs.split(",")):  # BLOCK_N:WARPS:STAGES:BLOCKS
                    bn, w, stages, blocks = (int(x) for x in cfg.split(":"))
                    methods[f"triton {cfg}"] = lambda bn=bn, w=w, stages=stages, blocks=blocks: flash_decoding.attend(
                        q, k, v, mask[0, 0], scale, block_n=bn, num_warps=w, num_stages=stages, target_blocks=blocks)
            for name, fn in methods.items():
                with torch.no_grad():
                    err = (fn().float() - ref).abs().max().item()
                    ms = graph_ms(fn, args.layers, args.replays)
                print(f"| {label} | {N} | {name} | {ms:.2f} | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

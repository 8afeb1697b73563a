"""Do CUDA graphs captured on torch's pool streams share cuBLAS workspaces, and does it corrupt them?

Why: the tenth session's runs with in-place projection graphs stalled on the GPU. The suspect: a graph keeps
the cuBLAS workspace of the stream it was captured on, and torch's pool hands the same 32 streams out again
and again (pytorch/pytorch#193402). This script captures skinny GEMMs (cuBLAS splits K into its workspace),
the way the restore and the captured forward do, on streams of a kind (`--streams pool`: `torch.cuda.Stream()`,
`own`: `CaptureStream`), then

* replays two graphs of the same stream index at once on two streams, and counts wrong results;
* destroys one group, overwrites the memory the allocator hands out next, and replays the other.

Run each kind in its own process (a kernel fault ends the process): prints one markdown row per kind.

    python benchmarks/workspace_sharing.py --streams pool
    python benchmarks/workspace_sharing.py --streams own
"""
from __future__ import annotations

import argparse
import gc

import torch

from hcache_adapter.capture_streams import CaptureStream

SHAPES = [(16, 4096, 4096), (32, 4096, 11008), (32, 11008, 4096)]  # (tokens, in, out): skinny, split-K


def capture_group(kind: str, x: list, w: list):
    """One graph per shape, each on a new stream of `kind`; returns (keep-alive, graphs, outputs)."""
    keep, graphs, outs = [], [], []
    for xi, wi in zip(x, w):
        out = xi @ wi  # warm-up off the graph
        if kind == "pool":
            stream, g = torch.cuda.Stream(), torch.cuda.CUDAGraph()
        else:
            lane = CaptureStream("cuda")
            stream, g = lane.stream, lane.graph()
            keep.append(lane)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            g.capture_begin()
            torch.matmul(xi, wi, out=out)
            g.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        keep.append(stream)
        graphs.append(g)
        outs.append(out)
    return keep, graphs, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", choices=("pool", "own"), default="pool", help="where graphs are captured")
    ap.add_argument("--groups", type=int, default=24, help="groups captured (pool streams wrap after 32)")
    ap.add_argument("--replays", type=int, default=200, help="concurrent replays per pair")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = [torch.randn(t, i, device="cuda", dtype=torch.float16) for t, i, _ in SHAPES]
    w = [torch.randn(i, o, device="cuda", dtype=torch.float16) / i ** 0.5 for _, i, o in SHAPES]
    expected = [xi @ wi for xi, wi in zip(x, w)]
    groups = [capture_group(args.streams, x, w) for _ in range(args.groups)]
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    wrong_concurrent = 0
    for r in range(args.replays):  # pairs of groups whose graphs reuse pool stream indices
        g1, g2 = groups[r % args.groups], groups[(r + 11) % args.groups]
        for o in g1[2] + g2[2]:
            o.zero_()
        a.wait_stream(torch.cuda.current_stream())
        b.wait_stream(torch.cuda.current_stream())
        for i in range(len(SHAPES)):
            with torch.cuda.stream(a):
                g1[1][i].replay()
            with torch.cuda.stream(b):
                g2[1][i].replay()
        torch.cuda.synchronize()
        wrong_concurrent += sum(not torch.allclose(o, e, rtol=1e-2, atol=0.05) for g in (g1, g2)
                                for o, e in zip(g[2], expected))
    del groups[: args.groups // 2]  # destroy half the groups (their graphs' reset clears their streams' workspaces)
    gc.collect()
    garbage = [torch.full((1 << 22,), 7.0, device="cuda") for _ in range(64)]
    wrong_after = 0
    for _ in range(20):
        for _, graphs, outs in groups:
            for g, o, e in zip(graphs, outs, expected):
                o.zero_()
                g.replay()
                torch.cuda.synchronize()
                wrong_after += not torch.allclose(o, e, rtol=1e-2, atol=0.05)
    intact = all(bool((t == 7.0).all()) for t in garbage)
    print(f"| {args.streams} | {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"wrong results in concurrent replays: {wrong_concurrent} | after destroying half: {wrong_after} | "
          f"other tensors intact: {intact} |")


if __name__ == "__main__":
    main()

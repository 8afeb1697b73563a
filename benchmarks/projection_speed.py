"""Generic projection vs the hand-written fast path: time to project every layer of one restore.

    python benchmarks/projection_speed.py                     # GPU: Llama-2-7B shape, 4096 tokens, fp16
    python benchmarks/projection_speed.py --device cpu --model tiny --tokens 64 --dtype float32

For a random Llama-2-7B-shaped model (32 layers, width 4096, MHA) it projects
every layer's K/V from GPU-resident hidden states of `--tokens` tokens, as a
restore does (one positions tensor per restore: the generic path records the
layers' call arguments once per restore, and that is inside the timing), and
reports the median over `--repeat` runs (CUDA events on a GPU, wall clock on
a CPU) of:

* fast, eager        - LlamaProjector, no compilation, no graphs
* fast, compiled     - LlamaProjector with torch.compile (HCache's default on a GPU; skipped on the CPU)
* generic            - GenericProjector: the model's own decoder layer up to its cache write

and the ratio generic / fast (the target is <= 1.3x of the fast path's GPU time).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcache_adapter.bench.models import build_model  # noqa: E402
from hcache_adapter.projection import fast_projector_for, generic_projector_for  # noqa: E402
from hcache_adapter.scheduler.profiling import time_median  # noqa: E402

TARGET = 1.3


def issue_seconds(fn, device: torch.device, repeat: int) -> float:
    """CPU time to issue `fn` (its GPU work not waited for), median."""
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(samples)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b", choices=("llama2-7b", "llama3-8b", "tiny"))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the model's (to fit a small GPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu --model tiny --tokens 64 --dtype float32")
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, dtype=dtype, device=device, layers=args.layers, max_positions=args.tokens + 64)
    n_layers, width = model.config.num_hidden_layers, model.config.hidden_size
    hidden = torch.randn(n_layers, 1, args.tokens, width, device=device, dtype=dtype)
    fast, generic = fast_projector_for(model), generic_projector_for(model)

    def restore_with(proj):
        def run():
            positions = torch.arange(args.tokens, device=device).unsqueeze(0)  # a new restore: a new tensor
            for layer in range(n_layers):
                proj.project_prefix(layer, hidden[layer], positions)
        return run

    with torch.no_grad():
        k_fast, v_fast = fast.project(0, hidden[0])
        k_gen, v_gen = generic.project(0, hidden[0])
    same = torch.equal(k_fast, k_gen) and torch.equal(v_fast, v_gen)
    rows = [("fast, eager", fast)]
    if device.type == "cuda":
        compiled = fast_projector_for(model)
        compiled.compile = True
        rows.append(("fast, compiled", compiled))
    rows.append(("generic", generic))
    times = {}
    print(f"{args.model}: {n_layers} layers, width {width}, {args.tokens} tokens, {args.dtype} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); "
          f"generic K/V bit-identical to the fast path: {same}")
    print(f"| path | {'GPU' if device.type == 'cuda' else 'wall'} ms, {n_layers} layers | CPU issue us/layer |")
    print("|---|---|---|")
    for name, proj in rows:
        run = restore_with(proj)
        times[name] = time_median(run, device, repeat=args.repeat, warmup=2)
        issue = issue_seconds(run, device, max(3, args.repeat // 3)) / n_layers
        print(f"| {name} | {times[name] * 1e3:.2f} | {issue * 1e6:.0f} |")
    ratio = times["generic"] / times["fast, eager"]
    best = min(v for k, v in times.items() if k != "generic")
    print(f"generic / fast eager: {ratio:.2f}x; generic / best fast: {times['generic'] / best:.2f}x "
          f"(target <= {TARGET}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

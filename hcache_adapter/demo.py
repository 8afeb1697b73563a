"""The main job: store, evict and restore real context state on a CPU, and measure it.

A Llama-shaped model with random weights serves a synthetic multi-round chat
trace (ShareGPT-like turn lengths) for several interleaved sessions, once per
restore method, each method with its own fresh store whose DRAM tier is small,
so earlier rounds' state spills to NVMe before the session comes back. For every
round it records time to first token (TTFT, through generate's streamer), how
many tokens were restored and from which tier, and checks that the generated
tokens are identical to the model's own `generate` (the "recompute" run).
"""
from __future__ import annotations

import argparse
import logging
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hcache_adapter.hcache import HCache
from hcache_adapter.timing import FirstTokenTimer
from hstore import StoreConfig, TieredStore

METHOD_ORDER = ("recompute", "kv", "hcache", "auto")


@dataclass
class Turn:
    session: int
    round: int
    user_tokens: list[int]


@dataclass
class RoundResult:
    method: str
    session: int
    round: int
    context: int
    restored: int
    restore_s: float
    ttft_s: float
    sources: dict[str, int]
    output: list[int] = field(default_factory=list)


def build_model(size: str, seed: int):
    from hcache_adapter.bench.models import build_model as build

    return build(size, seed=seed)


def chat_trace(sessions: int, rounds: int, system_tokens: int, seed: int, vocab: int = 32000) -> tuple[list[list[int]], list[Turn]]:
    """System prompts per session and user turns, interleaved round-robin across sessions.

    User turn lengths follow a log-normal fit of ShareGPT's user messages
    (median ~60 tokens, long tail), clipped to 16..400.
    """
    rng = np.random.default_rng(seed)
    systems = [rng.integers(100, vocab, system_tokens).tolist() for _ in range(sessions)]
    turns = []
    for r in range(rounds):
        for s in range(sessions):
            n = int(np.clip(rng.lognormal(mean=np.log(60), sigma=0.8), 16, 400))
            turns.append(Turn(s, r, rng.integers(100, vocab, n).tolist()))
    return systems, turns


def run_method(method: str, model, systems, turns, *, root: Path, dram_mib: int, max_new_tokens: int,
               reference: dict | None, progress) -> tuple[list[RoundResult], int]:
    """Replay the trace with one method on a fresh store; contexts follow the reference outputs when given.

    Returns the per-round results and the bytes the method stores per token.
    """
    shutil.rmtree(root, ignore_errors=True)
    cfg = StoreConfig(root=root, dram_bytes=dram_mib << 20, nvme_bytes=2 << 30)
    results = []
    with TieredStore(cfg) as store:
        hc = HCache(model, store, method=method)
        if method == "auto":
            hc.profile  # measure once, before the timed rounds
        _warm_up(hc, len(systems[0]) + 64)
        history = {s: list(sys_ids) for s, sys_ids in enumerate(systems)}
        for turn in turns:
            ids = history[turn.session] + turn.user_tokens
            input_ids = torch.tensor([ids])
            timer = FirstTokenTimer()
            out = hc.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=timer)
            info = hc.last_restore
            generated = out[0, len(ids):].tolist()
            results.append(RoundResult(method, turn.session, turn.round, len(ids), info.tokens if method != "recompute" else 0,
                                       info.seconds if method != "recompute" else 0.0, timer.ttft_s, dict(info.sources), generated))
            follow = reference[(turn.session, turn.round)] if reference else generated
            history[turn.session] = ids + follow
            progress.update(1)
        stored = hc.bytes_per_token() if method != "recompute" else 0
    return results, stored


def _warm_up(hc: HCache, tokens: int) -> None:
    """One save and one restore on a throwaway prompt, so round 0 is not charged for first-call costs."""
    ids = torch.randint(100, hc.model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(-1 & 0xFFFF))
    for _ in range(2):
        hc.generate(ids, max_new_tokens=2, do_sample=False)


def summarize(all_results: dict[str, list[RoundResult]], bytes_per_token: dict[str, int], rounds: int) -> str:
    ref = {(r.session, r.round): r.output for r in all_results["recompute"]}
    lines = []
    methods = [m for m in METHOD_ORDER if m in all_results]
    header = f"{'round':>5} {'context':>8} | " + " | ".join(f"{m + ' TTFT ms':>18}" for m in methods)
    lines.append("TTFT per round (median over sessions)")
    lines.append(header)
    lines.append("-" * len(header))
    for r in range(rounds):
        ctx = statistics.median(x.context for x in all_results["recompute"] if x.round == r)
        cells = []
        for m in methods:
            ttft = statistics.median(x.ttft_s for x in all_results[m] if x.round == r) * 1e3
            cells.append(f"{ttft:>18.1f}")
        lines.append(f"{r:>5} {int(ctx):>8} | " + " | ".join(cells))
    lines.append("")
    h2 = f"{'method':>10} {'bytes/token':>12} {'restored tok':>13} {'restore tok/s':>14} {'from nvme':>10} {'TTFT ms (r>=1)':>15} {'vs recompute':>13} {'identical':>10}"
    lines.append(h2)
    lines.append("-" * len(h2))
    base = statistics.median(x.ttft_s for x in all_results["recompute"] if x.round >= 1) if rounds > 1 else None
    for m in methods:
        rs = all_results[m]
        later = [x for x in rs if x.round >= 1] or rs
        restored = sum(x.restored for x in rs)
        rsec = sum(x.restore_s for x in rs)
        nvme = sum(x.sources.get("nvme", 0) for x in rs)
        total = sum(sum(v for k, v in x.sources.items() if k != "missing") for x in rs)
        ttft = statistics.median(x.ttft_s for x in later)
        same = all(x.output == ref[(x.session, x.round)] for x in rs)
        tps = f"{restored / rsec:,.0f}" if rsec > 0 and restored else "-"
        frac = f"{100 * nvme / total:.0f}%" if total else "-"
        speed = f"{base / ttft:.2f}x" if base else "-"
        lines.append(f"{m:>10} {bytes_per_token[m]:>12,} {restored:>13,} {tps:>14} {frac:>10} {ttft * 1e3:>15.1f} {speed:>13} {'yes' if same else 'NO':>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hcache demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("tiny", "small", "base"), default="base", help="model shape (base: 8 layers x 768)")
    p.add_argument("--sessions", type=int, default=3, help="interleaved chat sessions")
    p.add_argument("--rounds", type=int, default=4, help="rounds per session")
    p.add_argument("--system-tokens", type=int, default=256, help="system prompt length")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per round")
    p.add_argument("--dram-mib", type=int, default=24, help="DRAM tier capacity per store in MiB")
    p.add_argument("--methods", default=",".join(METHOD_ORDER), help="comma-separated methods (recompute always runs)")
    p.add_argument("--root", type=Path, default=None, help="where the stores live; a temporary directory when omitted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = ["recompute"] + [m for m in args.methods.split(",") if m and m != "recompute"]
    for m in methods:
        if m not in METHOD_ORDER:
            p.error(f"unknown method {m!r}")
    from tqdm import tqdm

    model = build_model(args.model, args.seed)
    systems, turns = chat_trace(args.sessions, args.rounds, args.system_tokens, args.seed)
    cfg = model.config
    print(f"model: Llama-shaped, {cfg.num_hidden_layers} layers x {cfg.hidden_size} wide, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, float32, random weights")
    print(f"trace: {args.sessions} sessions x {args.rounds} rounds, system prompt {args.system_tokens} tokens, "
          f"{args.max_new_tokens} new tokens per round; DRAM tier {args.dram_mib} MiB per store, rest spills to NVMe")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.mkdtemp(prefix="hcache-demo-", dir=".")
        root = Path(tmp)
    all_results: dict[str, list[RoundResult]] = {}
    bytes_per_token: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(turns) * len(methods), desc="rounds", unit="round") as bar:
            for m in methods:
                bar.set_postfix(method=m)
                ref = None if m == "recompute" else {(r.session, r.round): r.output for r in all_results["recompute"]}
                all_results[m], bytes_per_token[m] = run_method(
                    m, model, systems, turns, root=root / m, dram_mib=args.dram_mib,
                    max_new_tokens=args.max_new_tokens, reference=ref, progress=bar)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(summarize(all_results, bytes_per_token, args.rounds))
    identical = all(
        x.output == y.output for m in methods for x, y in zip(all_results[m], all_results["recompute"])
    )
    print(f"\noutputs identical to model.generate for every method and round: {'yes' if identical else 'NO'}"
          f"   ({time.perf_counter() - t0:.0f} s)")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`hcache serve-bench`: the paper's trace experiment, every method under one serving loop.

Replays a ShareGPT-like multi-round chat trace and an L-Eval-like long-document
trace (`trace`) with Poisson arrivals at several request rates through an
FCFS batching server (`simulate`: each batch runs for real, idle time is
skipped), with the same GPU context budget for every method (recompute, kv,
hcache, auto: one HCache each, recent contexts kept on the GPU by
`gpu_context_bytes`). Then a sensitivity run sweeps the GPU budget at one rate:
TTFT gain against GPU hit ratio, and the hit ratio above which restoring stops
paying. Writes summaries.csv, requests.csv, serve_bench.md and PNGs under --out
and prints a short table.

Presets: `ci` (tiny model on the CPU, a few seconds; what the tests run) and
`gpu-7b` (the Llama-2-7B shape in float16, sized for one call of about five
minutes on an H200; --time-limit-s skips runs that would overrun, and says so).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

METHODS = ("recompute", "kv", "hcache", "auto")
PRESETS = {
    "ci": dict(model="tiny", layers=2, dtype="float32", chunk_tokens=16, chat_requests=10, chat_active=3,
               chat_scale=0.08, doc_requests=6, doc_active=2, doc_scale=0.03, chat_rates="4,16", doc_rates="2,8",
               chat_gpu_tokens=256, doc_gpu_tokens=512, sensitivity_rate=8.0, sensitivity_fractions="0,0.3,1",
               max_new_tokens=3, max_batch=4, max_batch_tokens=8192, dram_gib=0.25, time_limit_s=300.0),
    "gpu-7b": dict(model="llama2-7b", layers=None, dtype="float16", chunk_tokens=64, chat_requests=32,
                   chat_active=16, chat_scale=1.0, doc_requests=12, doc_active=2, doc_scale=1.0,
                   chat_rates="1,2,4", doc_rates="0.25,0.5,1", chat_gpu_tokens=8192, doc_gpu_tokens=16384,
                   sensitivity_rate=2.0, sensitivity_fractions="0,0.1,0.25,0.5,1", max_new_tokens=4, max_batch=8,
                   max_batch_tokens=32768, dram_gib=40.0, time_limit_s=285.0),
}
SECTION_SHARES = (("rate:chat", 0.4), ("sensitivity:chat", 0.3), ("rate:doc", 0.3))  # of --time-limit-s


@dataclass(frozen=True)
class Run:
    section: str  # "rate" or "sensitivity"
    trace: str
    method: str
    rate: float
    budget_tokens: int

    def label(self) -> str:
        return f"{self.section} {self.trace} {self.method} @ {self.rate:g} req/s, GPU {self.budget_tokens} tokens"


def parse_args(argv):
    from hcache_adapter.bench.models import SHAPES

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS))
    known, _ = pre.parse_known_args(argv)
    preset = known.preset or ("gpu-7b" if torch.cuda.is_available() else "ci")
    p = argparse.ArgumentParser(prog="hcache serve-bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, parents=[pre])
    p.add_argument("--model", help=f"model shape, from {sorted(SHAPES)}")
    p.add_argument("--layers", type=int, help="override the layer count")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chunk-tokens", type=int)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--traces", default="chat,doc")
    p.add_argument("--chat-requests", type=int)
    p.add_argument("--chat-active", type=int, help="conversations open at once (competing for the GPU)")
    p.add_argument("--chat-scale", type=float, help="multiplies every chat length (1: ShareGPT's)")
    p.add_argument("--doc-requests", type=int)
    p.add_argument("--doc-active", type=int, help="documents being asked about at once")
    p.add_argument("--doc-scale", type=float, help="multiplies every document length (1: 4K-16K tokens)")
    p.add_argument("--chat-rates", help="request rates (req/s) of the chat trace")
    p.add_argument("--doc-rates", help="request rates (req/s) of the document trace")
    p.add_argument("--chat-gpu-tokens", type=int, help="GPU context budget for the chat runs, in K/V tokens")
    p.add_argument("--doc-gpu-tokens", type=int, help="GPU context budget for the document runs, in K/V tokens")
    p.add_argument("--policy", default="lru", help="hstore eviction policy of the GPU contexts: lru, s3fifo, cost")
    p.add_argument("--sensitivity-rate", type=float, help="chat rate of the GPU-budget sweep (0: no sweep)")
    p.add_argument("--sensitivity-fractions",
                   help="GPU budgets of the sweep, as fractions of the tokens of every conversation's context")
    p.add_argument("--sensitivity-methods", default="recompute,kv,hcache")
    p.add_argument("--pays", type=float, default=1.05, help="the TTFT gain below which restoring no longer pays")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per answer (the rest is carried)")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-batch-tokens", type=int, help="rows x columns of a batch")
    p.add_argument("--compile", choices=("on", "off"), default="off",
                   help="torch.compile the projection (on a GPU its first use takes tens of seconds)")
    p.add_argument("--root", type=Path, default=Path("/tmp/hcache-serve-bench"), help="store root")
    p.add_argument("--dram-gib", type=float)
    p.add_argument("--nvme-gib", type=float, default=0.0, help="> 0: an NVMe tier under the DRAM tier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit-s", type=float, help="runs that would end after this are skipped")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_bench"))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.preset = preset
    args.methods = _names(p, args.methods, METHODS, "methods")
    args.sensitivity_methods = _names(p, args.sensitivity_methods, METHODS, "sensitivity methods")
    args.traces = _names(p, args.traces, ("chat", "doc"), "traces")
    try:
        args.chat_rates = [float(x) for x in args.chat_rates.split(",") if x]
        args.doc_rates = [float(x) for x in args.doc_rates.split(",") if x]
        args.sensitivity_fractions = [float(x) for x in args.sensitivity_fractions.split(",") if x]
    except ValueError as e:
        p.error(f"rates and fractions are comma-separated numbers ({e})")
    if any(r <= 0 for r in args.chat_rates + args.doc_rates) or any(f < 0 for f in args.sensitivity_fractions):
        p.error("rates must be > 0 and fractions >= 0")
    return args


def _names(p, text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = set(names) - set(known)
    if unknown:
        p.error(f"unknown {what} {sorted(unknown)}; known: {list(known)}")
    return names


def plan_runs(args, traces: dict) -> list[Run]:
    runs = []
    if "chat" in traces:
        runs += [Run("rate", "chat", m, r, args.chat_gpu_tokens) for r in args.chat_rates for m in args.methods]
        if args.sensitivity_rate:
            total = traces["chat"].context_tokens()
            for f in args.sensitivity_fractions:
                runs += [Run("sensitivity", "chat", m, args.sensitivity_rate, int(f * total))
                         for m in args.sensitivity_methods]
    if "doc" in traces:
        runs += [Run("rate", "doc", m, r, args.doc_gpu_tokens) for r in args.doc_rates for m in args.methods]
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from hcache_adapter.bench.decode import hardware
    from hcache_adapter.bench.models import build_model, shape_label
    from hcache_adapter.serving import report
    from hcache_adapter.serving.simulate import ServerConfig
    from hcache_adapter.serving.trace import chat_trace, doc_trace
    from hstore import StoreConfig, TieredStore

    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = build_model(args.model, dtype=dtype, device=device, layers=args.layers, max_positions=32768,
                        seed=args.seed)
    vocab = model.config.vocab_size
    traces = {}
    if "chat" in args.traces:
        traces["chat"] = chat_trace(args.chat_requests, seed=args.seed, vocab=vocab, active=args.chat_active,
                                    scale=args.chat_scale)
    if "doc" in args.traces:
        traces["doc"] = doc_trace(args.doc_requests, seed=args.seed, vocab=vocab, active=args.doc_active,
                                  scale=args.doc_scale)
    cfg = ServerConfig(args.max_batch, args.max_batch_tokens, args.max_new_tokens,
                       model.generation_config.pad_token_id or 0, vocab)
    runs = plan_runs(args, traces)
    shutil.rmtree(args.root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    store_cfg = StoreConfig(root=args.root, dram_bytes=int(args.dram_gib * 2**30),
                            nvme_bytes=int(args.nvme_gib * 2**30), pin_dram=device.type == "cuda")
    header = _header(args, hardware(device, args.root), shape_label(model), traces, cfg, _kv_bytes_per_token(model))
    print(header, flush=True)
    bar = tqdm(total=sum(len(traces[r.trace].requests) for r in runs), desc="serve-bench", unit="req",
               disable=args.no_progress)
    done: list[tuple[report.RunSummary, list]] = []
    skipped: list[str] = []
    with TieredStore(store_cfg) as store:
        bench = _Bench(model, store, args, cfg, traces, device)
        for run in runs:
            if not bench.fits(run, started):
                skipped.append(run.label())
                bar.update(len(traces[run.trace].requests))
                continue
            bar.set_postfix_str(f"{run.trace} {run.method} {run.rate:g}/s {run.budget_tokens}t")
            done.append(bench.run(run, bar.update))
            _write(args.out, done, header, args.pays, skipped)  # what is done so far survives a crash
        bench.close()
    bar.close()
    _write(args.out, done, header, args.pays, skipped, plots=True)
    print(report.console_table([s for s, _ in done], args.pays))
    if skipped:
        print(f"{len(skipped)} runs skipped by --time-limit-s {args.time_limit_s:g} (listed in serve_bench.md)")
    print(f"results under {args.out} ({time.perf_counter() - started:.0f} s)")
    shutil.rmtree(args.root, ignore_errors=True)
    return 0


class _Bench:
    """One HCache per method over one store; runs reset state between them."""

    def __init__(self, model, store, args, cfg, traces: dict, device: torch.device):
        from hcache_adapter.keys import model_fingerprint

        self.model, self.store, self.args, self.cfg, self.traces, self.device = model, store, args, cfg, traces, device
        self.fingerprint = model_fingerprint(model)
        self.hcs: dict = {}
        self.walls: dict[tuple[str, str], float] = {}

    def hc(self, method: str):
        if method not in self.hcs:
            from hcache_adapter.hcache import HCache

            hc = HCache(self.model, self.store, method=method, namespace=f"sb-{method}",
                        chunk_tokens=self.args.chunk_tokens, model_id=self.fingerprint,
                        compile=self.args.compile == "on", gpu_context_bytes=0, gpu_context_policy=self.args.policy)
            self.hcs[method] = hc
            self._warm(hc)
        return self.hcs[method]

    def _warm(self, hc) -> None:
        """A few requests of every trace, untimed: compilation, graph capture, auto's profile."""
        from hcache_adapter.serving.simulate import replay

        for trace in self.traces.values():
            head = trace.requests[:3]
            sub = type(trace)(trace.name, trace.sessions, head, trace.sources).at_rate(1e6, self.args.seed)
            hc.resident.resize(1 << 40)
            replay(sub, hc.generate, self.cfg, self.device)
        self._reset(hc)

    def _reset(self, hc) -> None:
        from hcache_adapter.bench.decode import keys_with_prefix

        hc.resident.clear()
        for k in keys_with_prefix(self.store, hc.namespace + "/"):
            self.store.delete(k)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fits(self, run: Run, started: float) -> bool:
        """Whether the run is expected to end before its section's share of the time limit runs out."""
        key = f"{run.section}:{run.trace}"
        share = 0.0
        for name, s in SECTION_SHARES:
            share += s
            if name == key:
                break
        deadline = started + self.args.time_limit_s * min(share, 1.0)
        estimate = self.walls.get((key, run.method), max((w for (k, _), w in self.walls.items() if k == key),
                                                         default=0.0))
        return time.perf_counter() + estimate <= deadline

    def run(self, run: Run, progress):
        from hcache_adapter.serving import report
        from hcache_adapter.serving.simulate import replay

        hc = self.hc(run.method)
        hc.resident.resize(run.budget_tokens * hc.layout.plan_bytes_per_token("K" * hc.num_layers))
        trace = self.traces[run.trace].at_rate(run.rate, self.args.seed)
        before = hc.stats.copy()
        t0 = time.perf_counter()
        records = replay(trace, hc.generate, self.cfg, self.device, progress)
        wall = time.perf_counter() - t0
        delta = hc.stats.minus(before)
        self._reset(hc)
        self.walls[(f"{run.section}:{run.trace}", run.method)] = wall
        summary = report.summarize(records, delta, section=run.section, trace=run.trace, method=run.method,
                                   rate=run.rate, budget_tokens=run.budget_tokens, wall_s=wall)
        return summary, records

    def close(self) -> None:
        for hc in self.hcs.values():
            self._reset(hc)


def _header(args, hardware: str, shape: str, traces: dict, cfg, kv_bytes_per_token: int) -> str:
    gib = lambda tokens: tokens * kv_bytes_per_token / 2**30  # noqa: E731
    lines = [f"Hardware: {hardware}. Model: {args.model} ({shape}), {args.dtype}, {args.chunk_tokens}-token chunks, "
             f"state in {'DRAM' if not args.nvme_gib else 'DRAM over NVMe'}; preset {args.preset}.",
             f"Server: FCFS batches of up to {cfg.max_batch} requests / {cfg.max_batch_tokens} batch tokens, "
             f"{cfg.max_new_tokens} tokens generated per answer (the rest of the trace's answer is carried into "
             "the next prompt); every batch runs for real, idle time is skipped (virtual clock). GPU contexts: "
             f"policy {args.policy}; chat budget {args.chat_gpu_tokens} K/V tokens ({gib(args.chat_gpu_tokens):.2f} GiB), "
             f"documents {args.doc_gpu_tokens} ({gib(args.doc_gpu_tokens):.2f} GiB).",
             "TTFT includes queueing; gains are ratios of mean TTFT; GPU hit = requests that reuse a context and "
             "found it on the GPU."]
    for t in traces.values():
        ctx = [len(s.context) for s in t.sessions.values()]
        lines.append(f"Trace {t.name}: {len(t.requests)} requests over {len(t.sessions)} "
                     f"{'conversations' if t.name == 'chat' else 'documents'} ({t.params['active']} active), "
                     f"mean new tokens {sum(len(r.new_tokens) for r in t.requests) / len(t.requests):.0f}, "
                     f"mean answer {sum(r.output_tokens for r in t.requests) / len(t.requests):.0f}"
                     + (f", documents {min(ctx)}-{max(ctx)} tokens" if t.name == "doc" else "")
                     + f", length scale {t.params['scale']:g}. Statistics: {t.sources}.")
    return "\n\n".join(lines)


def _kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * kv_heads * head_dim * next(model.parameters()).element_size()


def _write(out: Path, done, header: str, pays: float, skipped: list[str], plots: bool = False) -> None:
    from hcache_adapter.serving import report

    rows = [s for s, _ in done]
    report.write_summaries(rows, out / "summaries.csv")
    report.write_requests(done, out / "requests.csv")
    (out / "serve_bench.md").write_text(report.markdown(rows, header, pays, skipped))
    if plots:
        report.plot(rows, out, pays)


if __name__ == "__main__":
    raise SystemExit(main())

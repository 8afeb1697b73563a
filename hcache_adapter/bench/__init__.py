"""`hcache bench`: time to first token through `hc.generate`, every method side by side.

For each model shape (random weights), stored context length and tier, one
request (n stored tokens + `--suffix-tokens` new ones) is served by every
method in interleaved rounds (see `ttft`), beside the "ideal" row (the prefix
K/V already on the GPU) and the copy floor (one pinned copy of the bytes a
method loads). Optionally also the time between tokens while saving, and a
multi-round chat checked against the model's own generate. Writes CSV,
markdown and a PNG under `--out`.
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def parse_args(argv):
    from hcache_adapter.bench.models import SHAPES
    from hcache_adapter.bench.ttft import ALL_METHODS

    p = argparse.ArgumentParser(prog="hcache bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="llama2-7b,llama3-8b", help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--contexts", default="1024,4096,16384,32768", help="stored prefix lengths (multiples of 64)")
    p.add_argument("--sources", default="dram,nvme", help="tiers the state is restored from")
    p.add_argument("--nvme-contexts", default="4096,16384", help="contexts also measured from NVMe")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--long-methods", default="recompute,ideal,hf_offloaded,kv,hcache,auto",
                   help="methods measured at >= 16K tokens (the slow rows)")
    p.add_argument("--nvme-methods", default="recompute,kv,hcache,auto", help="methods measured from NVMe")
    p.add_argument("--suffix-tokens", type=int, default=32, help="new tokens in the request")
    p.add_argument("--repeat", type=int, default=9, help="timed repetitions per method")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (the 2nd captures CUDA graphs)")
    p.add_argument("--long-repeat", type=int, default=5, help="repetitions from NVMe and at >= 16K tokens")
    p.add_argument("--long-warmup", type=int, default=2, help="warm-up rounds from NVMe and at >= 16K tokens")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--root", type=Path, default=Path("/tmp/hcache-bench"), help="store root (NVMe tier lives here)")
    p.add_argument("--dram-gib", type=float, default=40.0)
    p.add_argument("--nvme-gib", type=float, default=24.0)
    p.add_argument("--tbt-context", type=int, default=0, help="> 0: measure TBT while saving at this context")
    p.add_argument("--tbt-tokens", type=int, default=128)
    p.add_argument("--tbt-pairs", type=int, default=6, help="paired plain/saving decodes (after one warm-up pair)")
    p.add_argument("--chat-rounds", type=int, default=0, help="> 0: a chat trace checked against model.generate")
    p.add_argument("--chat-system-tokens", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("contexts", "nvme_contexts", "models", "sources", "methods", "long_methods", "nvme_methods"):
        setattr(args, name, [x for x in getattr(args, name).split(",") if x])
    args.contexts = [int(c) for c in args.contexts]
    args.nvme_contexts = [int(c) for c in args.nvme_contexts]
    for c in args.contexts:
        if c % 64:
            p.error("contexts must be multiples of 64 tokens")
    unknown = set(args.methods) - set(ALL_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from hcache_adapter.bench import report
    from hcache_adapter.bench.decode import chat_trace, hardware, keys_with_prefix, measure_tbt
    from hcache_adapter.bench.models import build_model, shape_label
    from hcache_adapter.bench.ttft import STORED, copy_floor_ms, measure_rows
    from hcache_adapter.hcache import HCache
    from hcache_adapter.prefill_graph import CAPTURE_ON_USE
    from hstore import StoreConfig, TieredStore

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shutil.rmtree(args.root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plans = [(n, s) for n in args.contexts for s in args.sources if s == "dram" or n in args.nvme_contexts]

    def is_long(n, s):
        return s == "nvme" or n >= 16384

    header = (f"Hardware: {hardware(device, args.root)}. dtype {args.dtype}; request = stored prefix + "
              f"{args.suffix_tokens} new tokens; median of {args.repeat} after {args.warmup} warm-up rounds "
              f"({args.long_repeat} after {args.long_warmup} from NVMe and at >= 16K), the heap then collected and "
              f"frozen (gc.freeze, as a server does once started).")
    warmups = {args.long_warmup if is_long(n, s) else args.warmup for n, s in plans}  # of the rows this run has
    if device.type == "cuda" and min(warmups, default=CAPTURE_ON_USE) < CAPTURE_ON_USE:
        header += (f" Warning: fewer than {CAPTURE_ON_USE} warm-up rounds; the captured first forward is captured "
                   "(and its blocks compiled) on its second use, so that capture lands in a timed round.")
        log.warning("fewer than %d warm-up rounds: a CUDA graph capture will land in a timed round", CAPTURE_ON_USE)
    print(header, flush=True)
    rows, floors, extra = [], {}, []

    def methods_for(n, s):
        return [m for m in args.methods if (n < 16384 or m in args.long_methods)
                and (s != "nvme" or m in args.nvme_methods)]

    total = sum((args.long_warmup + args.long_repeat if is_long(n, s) else args.warmup + args.repeat)
                * len(methods_for(n, s)) for n, s in plans) * len(args.models)
    bar = tqdm(total=total, desc="bench", unit="run", disable=args.no_progress)
    cfg = StoreConfig(root=args.root, dram_bytes=int(args.dram_gib * 2**30), nvme_bytes=int(args.nvme_gib * 2**30),
                      pin_dram=device.type == "cuda")
    with TieredStore(cfg) as store:
        for model_name in args.models:
            model = build_model(model_name, dtype=dtype, device=device, layers=args.layers,
                                max_positions=max(args.contexts) + 1024)
            print(f"{model_name}: {shape_label(model)}", flush=True)
            hcs = {}
            for m in args.methods:
                if m in STORED:
                    method = "hcache" if m == "hcache-eager-prefill" else m
                    hcs[m] = HCache(model, store, method=method, namespace=method,
                                    captured_prefill=False if m == "hcache-eager-prefill" else None)
            if "auto" in hcs:
                log.info("profile: %s", hcs["auto"].profile.to_json())
            if args.tbt_context:
                hc = HCache(model, store, method="hcache", namespace="tbt")
                extra.append(_tbt_line(model_name, measure_tbt(model, hc, args.tbt_context, args.tbt_tokens,
                                                               args.tbt_pairs, device)))
            if args.chat_rounds:
                extra += _chat_lines(model_name, chat_trace(model, store, args.methods, args.chat_rounds,
                                                            args.chat_system_tokens, 32, device))

            def drop(method: str) -> None:
                ns = "hcache" if method == "hcache-eager-prefill" else method
                store.drop_cached(keys_with_prefix(store, ns + "/"))

            for n in args.contexts:
                request = torch.randint(10, model.config.vocab_size, (1, n + args.suffix_tokens), device=device)
                for hc in {id(h): h for h in hcs.values()}.values():
                    hc.save(request[:, : n + 1])  # n stored tokens: whole chunks that leave one token to run
                sources = [s for s in args.sources if s == "dram" or n in args.nvme_contexts]
                store.flush()  # measured with the second stage idle: a flush in the background competes for the host
                for what, method in (("H", "hcache"), ("K", "kv")):
                    if method in hcs:
                        floors[(model_name, n, what)] = copy_floor_ms(hcs[method].loaded_bytes_per_token() * n, device)
                for source in sources:
                    long = is_long(n, source)
                    bar.set_postfix(model=model_name, n=n, source=source)
                    rows += measure_rows(model_name, model, hcs, request, n, source, drop, methods_for(n, source),
                                         repeat=args.long_repeat if long else args.repeat,
                                         warmup=args.long_warmup if long else args.warmup,
                                         progress=lambda: bar.update(1))
                    _write(args.out, rows, floors, header, extra)
                for ns in {("hcache" if m == "hcache-eager-prefill" else m) for m in hcs}:
                    for k in keys_with_prefix(store, ns + "/"):
                        store.delete(k)
            del model, hcs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    print(report.markdown(rows, floors, header, extra))
    shutil.rmtree(args.root, ignore_errors=True)
    return 0


def _write(out: Path, rows, floors, header, extra) -> None:
    from hcache_adapter.bench import report

    report.write_csv(rows, out / "ttft.csv")
    (out / "ttft.md").write_text(report.markdown(rows, floors, header, extra))
    report.plot(rows, out / "ttft.png")


def _tbt_line(model_name: str, t: dict) -> str:
    return (f"\nTBT while saving ({model_name}, {t['context_tokens']} tokens, {t['new_tokens']} new): "
            f"plain {t['tbt_ms_plain']:.2f} ms, saving {t['tbt_ms_saving']:.2f} ms, overhead "
            f"{t['overhead_pct']:+.1f}% (median of {t['pairs']} paired ratios)")


def _chat_lines(model_name: str, chat: list[dict]) -> list[str]:
    lines = [f"\nChat trace ({model_name}): TTFT per round; output compared with model.generate over the "
             "model's own prefill of the restored prefix.\n",
             "| method | round | context | restored | TTFT ms | identical |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['method']} | {c['round']} | {c['context_tokens']} | {c['restored_tokens']} | "
              f"{c['ttft_ms']:.1f} | {'yes' if c['identical'] else 'NO (from %s)' % c['first_diff']} |" for c in chat]
    return lines

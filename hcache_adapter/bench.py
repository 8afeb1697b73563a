"""`hcache bench`: restoring context state side by side, made for a GPU.

For each model shape (random weights), context length and storage tier, the
same prefix is restored by every method and the next user turn is prefilled on
top of it:

* recompute    - prefill from tokens (restore = prefill of the prefix; TTFT = one prefill of everything)
* kv           - K/V offload: load every layer's K and V
* hcache       - load every layer's input hidden state, project it to K/V
* auto         - the bubble-free scheduler's mix of recomputation and loading
* hf_offloaded - transformers' own DynamicCache(offloading=True) holding the prefix in host memory,
                 prefetching layer by layer during the forward (DRAM only; its restore time is its
                 TTFT minus the suffix prefill time)

Times are medians over repetitions after warm-up, taken with CUDA events. It
also measures the TBT overhead of saving during decoding and a multi-round chat
trace, and writes a CSV, a markdown table and a PNG plot.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hcache_adapter.compat import cache_kwarg, fill_layer, new_cache
from hcache_adapter.hcache import HCache
from hcache_adapter.timing import FirstTokenTimer
from hstore import StoreConfig, TieredStore

log = logging.getLogger(__name__)

MODELS = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512, vocab_size=1000),
}
STORED_METHODS = ("kv", "hcache", "auto")
ALL_METHODS = ("recompute", "kv", "hcache", "auto", "hf_offloaded")
CSV_FIELDS = ["model", "context_tokens", "source", "method", "restore_ms", "ttft_ms", "bytes_per_token",
              "restored_tokens", "restored_tokens_per_s", "recompute_layers", "max_abs_err", "repeats", "device"]


@dataclass
class Row:
    model: str
    context_tokens: int
    source: str
    method: str
    restore_ms: float
    ttft_ms: float
    bytes_per_token: int
    restored_tokens: int
    restored_tokens_per_s: float
    recompute_layers: int
    max_abs_err: float
    repeats: int
    device: str


@dataclass
class Timer:
    """CUDA-event timing on a GPU, perf_counter on the CPU."""

    device: torch.device
    marks: list = field(default_factory=list)

    def mark(self) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.device.type == "cuda":
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def build_model(name: str, dtype: torch.dtype, device: torch.device, layers: int | None, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(MODELS[name])
    if layers:
        spec["num_hidden_layers"] = layers
    config = LlamaConfig(**spec, max_position_embeddings=max_positions)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    return model.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def reference_kv(model, ids):
    cache = new_cache(model)
    model.base_model(input_ids=ids, use_cache=True, **{cache_kwarg(model.base_model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def max_error(cache, ref) -> float:
    err = 0.0
    for layer, (k, v) in zip(cache.layers, ref):
        n = k.shape[-2]
        err = max(err, (layer.keys[..., :n, :].float() - k.float()).abs().max().item(),
                  (layer.values[..., :n, :].float() - v.float()).abs().max().item())
    return err


@torch.no_grad()
def first_token(model, ids, cache, start: int) -> torch.Tensor:
    """Prefill ids[start:] on top of `cache` (holding ids[:start]) and pick the next token."""
    kw = {cache_kwarg(model): cache} if cache is not None else {}
    logits = model(input_ids=ids[:, start:], use_cache=True, logits_to_keep=1, **kw).logits
    return logits[:, -1].argmax(-1)


def measure_stored(hc: HCache, ids, n: int, reps: int, warmup: int, device, ref, drop_keys) -> tuple[float, float, int, int, float]:
    """(restore_ms, ttft_ms, restored_tokens, recompute_layers, max_err), medians over reps."""
    restores, ttfts, err, info = [], [], None, None
    for i in range(warmup + reps):
        if drop_keys is not None:
            hc.store.drop_cached(drop_keys)
        _sync(device)
        t = Timer(device)
        t.mark()
        cache, got = hc.restore(ids)
        t.mark()
        first_token(hc.model, ids, cache, got)
        t.mark()
        restore_ms, suffix_ms = t.intervals_ms()
        if i >= warmup:
            restores.append(restore_ms)
            ttfts.append(restore_ms + suffix_ms)
        if err is None:
            err = max_error(cache, ref) if got else float("nan")
            info = hc.last_restore
        del cache
    return statistics.median(restores), statistics.median(ttfts), info.tokens, info.recompute_layers, err


def measure_recompute(model, ids, n, reps, warmup, device) -> tuple[float, float]:
    restores, ttfts = [], []
    for i in range(warmup + reps):
        _sync(device)
        t = Timer(device)
        t.mark()
        reference_kv(model, ids[:, :n])
        t.mark()
        first_token(model, ids, None, 0)
        t.mark()
        restore_ms, ttft_ms = t.intervals_ms()
        if i >= warmup:
            restores.append(restore_ms)
            ttfts.append(ttft_ms)
    return statistics.median(restores), statistics.median(ttfts)


def measure_hf_offloaded(model, ids, n, ref, reps, warmup, device) -> tuple[float, float, float]:
    """(restore_ms, ttft_ms, suffix_ms): transformers' offloaded DynamicCache holding the prefix in host memory."""
    from transformers import DynamicCache

    host = [(k.to("cpu").pin_memory(), v.to("cpu").pin_memory()) for k, v in ref]
    ttfts, suffixes = [], []
    for i in range(warmup + reps):
        gpu_cache = new_cache(model)
        for l, (k, v) in enumerate(ref):
            fill_layer(gpu_cache, l, k.clone(), v.clone())
        off = DynamicCache(config=model.config, offloading=True)
        for l, (k, v) in enumerate(host):
            layer = off.layers[l]
            layer.lazy_initialization(ref[l][0][..., :0, :], ref[l][1][..., :0, :])
            layer.keys, layer.values = k, v
        _sync(device)
        t = Timer(device)
        t.mark()
        off.prefetch(0)
        first_token(model, ids, off, n)
        t.mark()
        first_token(model, ids, gpu_cache, n)
        t.mark()
        ttft_ms, suffix_ms = t.intervals_ms()
        if i >= warmup:
            ttfts.append(ttft_ms)
            suffixes.append(suffix_ms)
    ttft, suffix = statistics.median(ttfts), statistics.median(suffixes)
    return max(ttft - suffix, 0.0), ttft, suffix


def keys_with_prefix(store, prefix: str) -> list[bytes]:
    p = prefix.encode()
    return [k for k in store.keys() if k.startswith(p)]


def measure_tbt(model, hc: HCache, n: int, new_tokens: int, reps: int, device) -> dict:
    """Median time between tokens while decoding, without and with HCache saving every chunk.

    Decoding with transformers is bound by the host CPU, whose speed drifts on a
    shared machine: runs are paired (same prompt, the order alternating) and the
    overhead is the median of the pairs' ratios, not a ratio of two medians.
    """
    vocab = model.config.vocab_size
    results: dict[str, list[float]] = {"plain": [], "saving": []}
    ratios = []
    for rep in range(reps + 1):
        ids = torch.randint(10, vocab, (1, n), device=device)
        pair = {}
        for mode in (("plain", "saving") if rep % 2 else ("saving", "plain")):
            stamps = _TokenStamps()
            gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=stamps)
            if mode == "plain":
                model.generate(ids, **gen)
            else:
                hc.generate(ids, **gen)
            pair[mode] = stamps.median_gap_ms()
        for k in keys_with_prefix(hc.store, hc.namespace + "/"):
            hc.store.delete(k)
        if rep:  # the first pair warms up
            for mode, t in pair.items():
                results[mode].append(t)
            ratios.append(pair["saving"] / pair["plain"])
    plain, saving = statistics.median(results["plain"]), statistics.median(results["saving"])
    return {"context_tokens": n, "new_tokens": new_tokens, "tbt_ms_plain": plain, "tbt_ms_saving": saving,
            "overhead_pct": 100 * (statistics.median(ratios) - 1), "pairs": len(ratios)}


class _TokenStamps(FirstTokenTimer):
    def __init__(self):
        super().__init__()
        self.stamps: list[float] = []

    def put(self, value):
        super().put(value)
        self.stamps.append(time.perf_counter())

    def median_gap_ms(self) -> float:
        gaps = [(b - a) * 1e3 for a, b in zip(self.stamps[2:], self.stamps[3:])]
        return statistics.median(gaps)


def chat_trace(model, store, methods, rounds: int, system_tokens: int, new_tokens: int, device, seed: int = 0) -> list[dict]:
    """TTFT per round of one multi-round chat, per method; each round's output is checked against
    `model.generate` on the same tokens over the model's own prefill of the restored prefix (greedy,
    a fixed number of new tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    system = rng.integers(10, vocab, system_tokens).tolist()
    users = [rng.integers(10, vocab, int(np.clip(rng.lognormal(np.log(60), 0.8), 16, 400))).tolist() for _ in range(rounds)]
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    rows = []
    for method in ("recompute",) + tuple(m for m in methods if m in STORED_METHODS):
        hc = HCache(model, store, method=method, namespace=f"chat-{method}")
        history = list(system)
        for r in range(rounds):
            ids = torch.tensor([history + users[r]], device=device)
            timer = FirstTokenTimer()
            _sync(device)
            out = hc.generate(ids, streamer=timer, **gen)
            generated = out[0, ids.shape[1]:].tolist()
            # The same computation without HCache: the model's own prefill of the prefix that was
            # restored, then generate on top (in fp16 a different split of the prompt alone can flip
            # a near-tie of a random model's logits, which would say nothing about the restore).
            n = hc.last_restore.tokens if method != "recompute" else 0
            own = None
            if n:
                own = new_cache(model)
                with torch.no_grad():
                    model(ids[:, :n], use_cache=True, **{cache_kwarg(model): own})
            reference = model.generate(ids, **({cache_kwarg(model): own} if own is not None else {}), **gen)
            reference = reference[0, ids.shape[1]:].tolist()
            first_diff = next((i for i, (a, b) in enumerate(zip(generated, reference)) if a != b), None)
            rows.append({"method": method, "round": r, "context_tokens": ids.shape[1],
                         "restored_tokens": hc.last_restore.tokens if method != "recompute" else 0,
                         "restore_ms": hc.last_restore.seconds * 1e3 if method != "recompute" else 0.0,
                         "ttft_ms": timer.ttft_s * 1e3, "identical": generated == reference, "first_diff": first_diff})
            history = history + users[r] + generated
        for k in keys_with_prefix(store, f"chat-{method}/"):
            store.delete(k)
    return rows


def hardware(device, root: Path) -> str:
    parts = [f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"]
    try:
        with open("/proc/meminfo") as f:
            parts.append(f"{int(f.readline().split()[1]) / 2**20:.0f} GiB RAM")
    except OSError:
        pass
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    parts.append(f"torch {torch.__version__}")
    import transformers

    parts.append(f"transformers {transformers.__version__}")
    return ", ".join(parts)


def write_outputs(rows: list[Row], tbt: list[dict], chat: list[dict], out_dir: Path, header: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "restore.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    (out_dir / "restore.md").write_text(markdown(rows, tbt, chat, header))
    try:
        plot(rows, out_dir / "restore.png")
    except ImportError:
        log.warning("matplotlib is not installed: no plot")


def markdown(rows: list[Row], tbt: list[dict], chat: list[dict], header: str) -> str:
    lines = [f"# hcache bench\n\n{header}\n", "## Restore and TTFT (medians, CUDA events)\n",
             "| model | context | source | method | restore ms | TTFT ms | restored tok/s | bytes/token | "
             "recomputed layers | max abs err | TTFT vs recompute | restore vs kv |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r.model, r.context_tokens, r.source, r.method): r for r in rows}
    for r in rows:
        rec = by_key.get((r.model, r.context_tokens, "dram", "recompute"))
        kv = by_key.get((r.model, r.context_tokens, r.source, "kv"))
        speed = f"{rec.ttft_ms / r.ttft_ms:.2f}x" if rec and r.ttft_ms else "-"
        vs_kv = f"{kv.restore_ms / r.restore_ms:.2f}x" if kv and r.restore_ms and r.method != "recompute" else "-"
        err = "-" if r.max_abs_err != r.max_abs_err else f"{r.max_abs_err:.2e}"
        lines.append(f"| {r.model} | {r.context_tokens} | {r.source} | {r.method} | {r.restore_ms:.1f} | {r.ttft_ms:.1f} | "
                     f"{r.restored_tokens_per_s:,.0f} | {r.bytes_per_token:,} | {r.recompute_layers} | {err} | {speed} | {vs_kv} |")
    if tbt:
        lines += ["", "## TBT overhead of saving during decoding (hcache method)\n",
                  "Median time between tokens; overhead = median over paired runs of saving/plain.\n",
                  "| model | context | new tokens | TBT ms plain | TBT ms saving | overhead | pairs |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {t['model']} | {t['context_tokens']} | {t['new_tokens']} | {t['tbt_ms_plain']:.2f} | "
                  f"{t['tbt_ms_saving']:.2f} | {t['overhead_pct']:+.1f}% | {t['pairs']} |" for t in tbt]
    if chat:
        lines += ["", "## Multi-round chat (TTFT per round, state in DRAM)\n",
                  "Each round's output is compared with `model.generate` on the same tokens whose prefix cache is the "
                  "model's own prefill of the tokens that were restored (the same split, without HCache).\n",
                  "| model | method | round | context | restored | restore ms (wall) | TTFT ms | identical output |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['method']} | {c['round']} | {c['context_tokens']} | {c['restored_tokens']} | "
                  f"{c['restore_ms']:.1f} | {c['ttft_ms']:.1f} | {'yes' if c['identical'] else 'NO (from token %s)' % c['first_diff']} |" for c in chat]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in rows})
    sources = [s for s in ("dram", "nvme") if any(r.source == s for r in rows)]
    fig, axes = plt.subplots(len(models), len(sources), figsize=(6 * len(sources), 4 * len(models)), squeeze=False)
    methods = [m for m in ALL_METHODS if any(r.method == m for r in rows)]
    for i, model in enumerate(models):
        for j, source in enumerate(sources):
            ax = axes[i][j]
            contexts = sorted({r.context_tokens for r in rows if r.model == model})
            width = 0.8 / len(methods)
            for k, method in enumerate(methods):
                ys = []
                for c in contexts:
                    r = next((x for x in rows if (x.model, x.context_tokens, x.method) == (model, c, method)
                              and x.source in (source, "dram" if method == "recompute" else source)), None)
                    ys.append(r.ttft_ms if r else 0)
                ax.bar([x + k * width for x in range(len(contexts))], ys, width, label=method)
            ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(contexts))], [str(c) for c in contexts])
            ax.set_yscale("log")
            ax.set_xlabel("context tokens")
            ax.set_ylabel("TTFT ms (log)")
            ax.set_title(f"{model}, state in {source}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hcache bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="llama2-7b,llama3-8b", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--contexts", default="1024,4096,8192", help="prefix lengths in tokens (multiples of 64)")
    p.add_argument("--sources", default="dram,nvme", help="tiers the state is restored from")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--suffix-tokens", type=int, default=32, help="new tokens prefilled after the restore")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed restores first (the 2nd captures CUDA graphs)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--root", type=Path, default=Path("/tmp/hcache-bench"), help="store root (NVMe tier lives here)")
    p.add_argument("--dram-gib", type=float, default=16.0)
    p.add_argument("--nvme-gib", type=float, default=24.0)
    p.add_argument("--tbt-context", type=int, default=1024, help="0 skips the TBT measurement")
    p.add_argument("--tbt-tokens", type=int, default=128)
    p.add_argument("--tbt-pairs", type=int, default=6, help="paired plain/saving decodes (after one warm-up pair)")
    p.add_argument("--chat-rounds", type=int, default=4, help="0 skips the chat trace")
    p.add_argument("--chat-system-tokens", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    models = [m for m in args.models.split(",") if m]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    sources = [s for s in args.sources.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for c in contexts:
        if c % 64:
            p.error("contexts must be multiples of 64 tokens")
    shutil.rmtree(args.root, ignore_errors=True)
    header = f"Hardware: {hardware(device, args.root)}. dtype {args.dtype}; suffix {args.suffix_tokens} tokens; " \
             f"median of {args.repeat} after {args.warmup} warm-up."
    print(header, flush=True)
    rows: list[Row] = []
    tbt_rows: list[dict] = []
    chat_rows: list[dict] = []
    steps = len(models) * len(contexts) * (len(sources) * len(methods) + 1)
    bar = tqdm(total=steps, desc="bench", unit="step")
    cfg = StoreConfig(root=args.root, dram_bytes=int(args.dram_gib * 2**30), nvme_bytes=int(args.nvme_gib * 2**30),
                      pin_dram=device.type == "cuda")
    with TieredStore(cfg) as store:
        for model_name in models:
            model = build_model(model_name, dtype, device, args.layers, max(contexts) + 1024)
            hcs = {m: HCache(model, store, method=m, namespace=m) for m in STORED_METHODS if m in methods}
            if "auto" in hcs:
                profile = hcs["auto"].profile
                log.warning("profile: %s", profile.to_json())
            # First, while the process is fresh: decoding speed and the chat trace.
            if args.tbt_context:
                hc = HCache(model, store, method="hcache", namespace="tbt")
                t = measure_tbt(model, hc, args.tbt_context, args.tbt_tokens, args.tbt_pairs, device)
                tbt_rows.append({"model": model_name, **t})
            if args.chat_rounds:
                for c in chat_trace(model, store, methods, args.chat_rounds, args.chat_system_tokens, 32, device):
                    chat_rows.append({"model": model_name, **c})
            for n in contexts:
                ids = torch.randint(10, model.config.vocab_size, (1, n + args.suffix_tokens), device=device)
                ref = reference_kv(model, ids[:, :n])
                for hc in hcs.values():
                    hc.save(ids[:, :n])
                store.flush()
                bar.update(1)
                for source in sources:
                    for method in methods:
                        bar.set_postfix(model=model_name, n=n, source=source, method=method)
                        if method == "recompute":
                            if source == sources[0]:
                                restore_ms, ttft_ms = measure_recompute(model, ids, n, args.repeat, args.warmup, device)
                                rows.append(Row(model_name, n, "dram", method, restore_ms, ttft_ms, 0, n,
                                                n / restore_ms * 1e3, model.config.num_hidden_layers, 0.0, args.repeat, str(device)))
                        elif method == "hf_offloaded":
                            if source == "dram" and device.type == "cuda":
                                restore_ms, ttft_ms, _ = measure_hf_offloaded(model, ids, n, ref, args.repeat, args.warmup, device)
                                kv_bpt = HCache(model, store, "kv", namespace="x").bytes_per_token()
                                rows.append(Row(model_name, n, source, method, restore_ms, ttft_ms, kv_bpt, n,
                                                n / max(restore_ms, 1e-9) * 1e3, 0, 0.0, args.repeat, str(device)))
                        else:
                            hc = hcs[method]
                            drop = keys_with_prefix(store, method + "/") if source == "nvme" else None
                            restore_ms, ttft_ms, got, r, err = measure_stored(hc, ids, n, args.repeat, args.warmup, device, ref, drop)
                            rows.append(Row(model_name, n, source, method, restore_ms, ttft_ms, hc.bytes_per_token(), got,
                                            got / restore_ms * 1e3 if restore_ms else 0.0, r, err, args.repeat, str(device)))
                        bar.update(1)
                for m in hcs:
                    for k in keys_with_prefix(store, m + "/"):
                        store.delete(k)
                del ref
                write_outputs(rows, tbt_rows, chat_rows, args.out, header)
            write_outputs(rows, tbt_rows, chat_rows, args.out, header)
            del model, hcs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    print(markdown(rows, tbt_rows, chat_rows, header))
    shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Writing what `hcache bench` measured: CSV (every row), markdown (one table per request), PNG."""
from __future__ import annotations

import csv
import logging
import statistics
from dataclasses import asdict, fields
from pathlib import Path

from hcache_adapter.bench.ttft import ALL_METHODS, Row

log = logging.getLogger(__name__)

CSV_FIELDS = [f.name for f in fields(Row) if f.name != "samples"] + ["samples_ms"]
BASELINES = ("recompute", "kv", "hcache", "hf_offloaded")  # what auto is held against (issue 8: <= 1.03x the best)


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            out = {k: v for k, v in asdict(r).items() if k in CSV_FIELDS}
            out["samples_ms"] = ";".join(f"{x:.3f}" for x in r.samples)  # round order: pairs across methods
            w.writerow(out)


def paired_ratio(a: Row, b: Row) -> float:
    """Median over the timed rounds of a's time / b's time in the same round (nan without common rounds).

    Methods run interleaved, one round after another, so a round's two times share the host's drift; the
    median of the rounds' ratios resolves differences that the medians' spread hides on a noisy host."""
    ratios = [x / y for x, y in zip(a.samples, b.samples) if y > 0]
    return statistics.median(ratios) if ratios else float("nan")


def auto_against_best(group: dict[str, Row]) -> str | None:
    """A line comparing auto with the best other method of one request, round by round."""
    auto = group.get("auto")
    others = [group[m] for m in BASELINES if m in group]
    if auto is None or not others or not auto.samples:
        return None
    best = min(others, key=lambda r: r.ttft_ms)
    ratio = paired_ratio(auto, best)
    if ratio != ratio:
        return None
    return (f"\nauto / best other method ({best.method}), round by round: {ratio:.3f}x "
            f"(median of {min(len(auto.samples), len(best.samples))} paired rounds)")


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def request_tables(rows: list[Row], floors: dict[tuple, float]) -> list[str]:
    """One table per (model, context, tier), methods in a fixed order, with the copy floors beside them."""
    lines: list[str] = []
    keys = sorted({(r.model, r.context, r.source) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "dram"))
    for model, n, source in keys:
        group = {r.method: r for r in rows if (r.model, r.context, r.source) == (model, n, source)}
        rec = group.get("recompute") or next((r for r in rows if (r.model, r.context, r.method) ==
                                              (model, n, "recompute")), None)
        ideal = next((r for r in rows if (r.model, r.context, r.method) == (model, n, "ideal")), None)
        lines += [f"\n### {model}, {n} tokens stored, state in {source}\n",
                  "| method | TTFT ms | ± | vs recompute | vs ideal | restore issue ms | restored | "
                  "recomputed layers | bytes/token | max abs err | alloc retries |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in ALL_METHODS:
            r = group.get(m)
            if r is None:
                continue
            speed = f"{rec.ttft_ms / r.ttft_ms:.2f}x" if rec and r.ttft_ms else "-"
            vs_ideal = f"{r.ttft_ms / ideal.ttft_ms:.2f}" if ideal and ideal.ttft_ms else "-"
            err = "-" if r.max_abs_err != r.max_abs_err else f"{r.max_abs_err:.1e}"
            lines.append(f"| {m} | {r.ttft_ms:.1f} | {_fmt(r.spread_ms)} | {speed} | {vs_ideal} | "
                         f"{_fmt(r.restore_issue_ms)} | {r.restored_tokens} | {r.recompute_layers} | "
                         f"{r.bytes_per_token:,} | {err} | {r.alloc_retries} |")
        for what in ("H", "K"):
            ms = floors.get((model, n, what))
            if ms is not None and ms == ms:
                label = "hidden states" if what == "H" else "K/V"
                lines.append(f"| copy floor ({label}) | {ms:.1f} | | | | | | | | | |")
        paired = auto_against_best(group)
        if paired:
            lines.append(paired)
    return lines


def markdown(rows: list[Row], floors: dict, header: str, extra: list[str] = ()) -> str:
    lines = [f"# hcache bench\n\n{header}\n",
             "TTFT: wall clock of a synchronised `generate(..., max_new_tokens=1)`, median over repetitions "
             "(± half the p10-p90 range), methods interleaved in rounds. `restore issue`: host time of the "
             "restore call inside `hc.generate` (the GPU work it queues runs under generate's prefill). `alloc retries`: "
             "CUDA allocations in the timed runs that had to free the allocator's cache and synchronise (short of "
             "GPU memory)."]
    lines += request_tables(rows, floors)
    lines += list(extra)
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return
    models = sorted({r.model for r in rows})
    sources = [s for s in ("dram", "nvme") if any(r.source == s for r in rows)]
    fig, axes = plt.subplots(len(models), len(sources), figsize=(6.5 * len(sources), 4.2 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        for j, source in enumerate(sources):
            ax = axes[i][j]
            for m in ALL_METHODS:
                pts = sorted((r.context, r.ttft_ms) for r in rows if r.model == model and r.method == m
                             and (r.source == source or (m == "recompute")))
                pts = sorted(dict(pts).items())
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("stored context (tokens)")
            ax.set_ylabel("TTFT ms (log)")
            ax.set_title(f"{model}, state in {source}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

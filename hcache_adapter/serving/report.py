"""What `hcache serve-bench` writes: a summary per run (CSV), every request (CSV), markdown, PNGs.

Gains are ratios of mean TTFT at the same trace, rate and GPU budget
(baseline / hcache). "When not to use it": the GPU hit ratio above which
hcache's gain falls below `pays` (1.05 by default), read off the sensitivity
runs (interpolated between measured points) and, as a cross-check, off a
straight-line fit of each method's mean TTFT against the hit ratio.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)

METHOD_ORDER = ("recompute", "kv", "hcache", "auto")
PAPER = {  # issue 12 / HCache (EuroSys'25): TTFT of HCache vs the baselines
    "chat": "ShareGPT4: 1.27-1.90x vs KV offload, 2.21-5.73x vs recompute (over both traces)",
    "doc": "L-Eval: 1.62-1.93x vs KV offload",
    "sensitivity": "the gain shrinks as the GPU hit ratio grows: 1.15x at 94%",
}


@dataclass
class RunSummary:
    section: str  # "rate" (TTFT vs request rate) or "sensitivity" (GPU budget swept)
    trace: str
    method: str
    rate: float
    gpu_budget_tokens: int
    requests: int
    reusing: int  # requests whose context an earlier request left
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    ttft_mean_ms: float
    tbt_ms: float
    throughput_rps: float
    tokens_per_s: float  # generated
    gpu_hit_ratio: float  # GPU hits / requests reusing a context
    restored_tok_s: float  # prefix tokens loaded from the store per second of the run
    restored_tokens: int
    gpu_hits: int
    gpu_evictions: int
    mean_batch: float
    makespan_s: float
    wall_s: float  # real seconds the run took (idle time skipped)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records, delta: dict, *, section: str, trace: str, method: str, rate: float, budget_tokens: int,
              wall_s: float) -> RunSummary:
    """One run's figures from its request records and the HCache counters it moved (`ServingStats.minus`)."""
    ttft = [r.ttft_s * 1e3 for r in records]
    tbt = [r.tbt_s * 1e3 for r in records if r.tbt_s == r.tbt_s]
    start = min((r.arrival_s for r in records), default=0.0)
    makespan = max((r.finish_s for r in records), default=0.0) - start
    reusing = sum(r.reuses_context for r in records)
    span = max(makespan, 1e-9)
    return RunSummary(section, trace, method, rate, budget_tokens, len(records), reusing,
                      _pct(ttft, 50), _pct(ttft, 90), _pct(ttft, 99), sum(ttft) / max(len(ttft), 1),
                      sum(tbt) / len(tbt) if tbt else float("nan"), len(records) / span,
                      sum(r.generated for r in records) / span,
                      min(1.0, delta.get("gpu_hits", 0) / reusing) if reusing else 0.0,
                      delta.get("restored_tokens", 0) / span, delta.get("restored_tokens", 0),
                      delta.get("gpu_hits", 0), delta.get("gpu_evictions", 0),
                      sum(r.batch_size for r in records) / max(len(records), 1),
                      makespan, wall_s)


# ---------------------------------------------------------------------------- files
def write_summaries(rows: list[RunSummary], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[x.name for x in fields(RunSummary)])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def write_requests(runs: list[tuple[RunSummary, list]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = None
        for summary, records in runs:
            for rec in records:
                row = {"section": summary.section, "trace": summary.trace, "method": summary.method,
                       "rate": summary.rate, "gpu_budget_tokens": summary.gpu_budget_tokens, **asdict(rec),
                       "ttft_s": rec.ttft_s}
                if w is None:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    w.writeheader()
                w.writerow(row)


# ---------------------------------------------------------------------------- gains and thresholds
def gains(rows: list[RunSummary], baseline: str, method: str = "hcache") -> list[tuple[RunSummary, float]]:
    """(method's run, baseline mean TTFT / method's) for every run matched on section, trace, rate and budget."""
    key = lambda r: (r.section, r.trace, r.rate, r.gpu_budget_tokens)  # noqa: E731
    base = {key(r): r for r in rows if r.method == baseline}
    out = []
    for r in rows:
        b = base.get(key(r))
        if r.method == method and b is not None and r.ttft_mean_ms > 0:
            out.append((r, b.ttft_mean_ms / r.ttft_mean_ms))
    return out


def crossing(points: list[tuple[float, float]], pays: float) -> float | None:
    """The hit ratio where gain first falls below `pays`, interpolated between measured (hit ratio, gain)
    points; the lowest ratio if it never reaches `pays`; None if it stays at or above it throughout."""
    pts = sorted(points)
    if not pts:
        return None
    if pts[0][1] < pays:
        return pts[0][0]
    for (h0, g0), (h1, g1) in zip(pts, pts[1:]):
        if g0 >= pays > g1:
            return h0 + (h1 - h0) * (g0 - pays) / (g0 - g1)
    return None


def linear_crossing(base: list[tuple[float, float]], ours: list[tuple[float, float]], pays: float) -> float | None:
    """From straight-line fits TTFT(h) = a + b h of both methods: the h in [0, 1] where base/ours = `pays`."""
    fb, fo = _fit(base), _fit(ours)
    if fb is None or fo is None:
        return None
    (ab, bb), (ao, bo) = fb, fo
    denom = bb - pays * bo
    if abs(denom) < 1e-12:
        return None
    h = (pays * ao - ab) / denom
    return h if 0.0 <= h <= 1.0 else None


def _fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(h for h, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((h - mx) ** 2 for h, _ in points)
    if sxx == 0:
        return None
    b = sum((h - mx) * (t - my) for h, t in points) / sxx
    return my - b * mx, b


def when_not_to_use(rows: list[RunSummary], pays: float) -> list[str]:
    """Sentences on the hit ratio above which restoring stops paying, per baseline."""
    sens = [r for r in rows if r.section == "sensitivity"]
    lines = []
    for baseline in ("recompute", "kv"):
        pairs = gains(sens, baseline)
        if not pairs:
            continue
        points = [(r.gpu_hit_ratio, g) for r, g in pairs]
        measured = crossing(points, pays)
        by_budget = {r.gpu_budget_tokens: r for r in sens if r.method == baseline}
        base_pts = [(r.gpu_hit_ratio, r.ttft_mean_ms) for r in by_budget.values()]
        ours_pts = [(r.gpu_hit_ratio, r.ttft_mean_ms) for r, _ in pairs]
        fitted = linear_crossing(base_pts, ours_pts, pays)
        lowest = min(points)
        if measured is None:
            text = (f"vs {baseline}: hcache stays >= {pays:.2f}x up to the highest hit ratio measured "
                    f"({max(points)[0]:.0%})")
        elif lowest[1] < pays:
            text = f"vs {baseline}: hcache is below {pays:.2f}x already at the lowest hit ratio measured ({measured:.0%})"
        else:
            text = f"vs {baseline}: restoring with hcache stops paying ({pays:.2f}x) above a GPU hit ratio of {measured:.0%}"
        if fitted is not None:
            text += f" (a straight-line fit of mean TTFT against hit ratio puts it at {fitted:.0%})"
        lines.append(text + ".")
    return lines


# ---------------------------------------------------------------------------- markdown and console
def _f(x: float, d: int = 1) -> str:
    return "-" if x != x else f"{x:.{d}f}"


def _ordered(rows):
    return sorted(rows, key=lambda r: (r.trace, r.rate, r.gpu_budget_tokens,
                                       METHOD_ORDER.index(r.method) if r.method in METHOD_ORDER else 9))


def rate_table(rows: list[RunSummary]) -> list[str]:
    lines = []
    base = {(r.trace, r.rate, r.gpu_budget_tokens, r.method): r for r in rows}
    for trace in sorted({r.trace for r in rows}):
        lines += [f"\n### {trace}: TTFT vs request rate\n",
                  "| rate req/s | method | TTFT p50 ms | p90 | p99 | mean | TBT ms | req/s | tok/s | GPU hit | "
                  "restored tok/s | vs recompute | vs kv |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in _ordered([r for r in rows if r.trace == trace]):
            rec = base.get((r.trace, r.rate, r.gpu_budget_tokens, "recompute"))
            kv = base.get((r.trace, r.rate, r.gpu_budget_tokens, "kv"))
            vs = lambda b: f"{b.ttft_mean_ms / r.ttft_mean_ms:.2f}x" if b and r.ttft_mean_ms else "-"  # noqa: E731
            lines.append(f"| {r.rate:g} | {r.method} | {_f(r.ttft_p50_ms)} | {_f(r.ttft_p90_ms)} | "
                         f"{_f(r.ttft_p99_ms)} | {_f(r.ttft_mean_ms)} | {_f(r.tbt_ms)} | {_f(r.throughput_rps, 2)} | "
                         f"{_f(r.tokens_per_s)} | {r.gpu_hit_ratio:.0%} | {_f(r.restored_tok_s, 0)} | {vs(rec)} | "
                         f"{vs(kv)} |")
    return lines


def sensitivity_table(rows: list[RunSummary]) -> list[str]:
    sens = [r for r in rows if r.section == "sensitivity"]
    if not sens:
        return []
    methods = [m for m in METHOD_ORDER if any(r.method == m for r in sens)]
    lines = ["\n### Sensitivity: GPU context budget swept (gain vs GPU hit ratio)\n",
             "| GPU budget tokens | GPU hit ratio | " + " | ".join(f"{m} mean TTFT ms" for m in methods)
             + " | hcache vs recompute | hcache vs kv |",
             "|---" * (len(methods) + 4) + "|"]
    for budget in sorted({r.gpu_budget_tokens for r in sens}):
        group = {r.method: r for r in sens if r.gpu_budget_tokens == budget}
        hit = sum(r.gpu_hit_ratio for r in group.values()) / len(group)
        hc = group.get("hcache")
        vs = lambda m: (f"{group[m].ttft_mean_ms / hc.ttft_mean_ms:.2f}x" if hc and m in group  # noqa: E731
                        and hc.ttft_mean_ms else "-")
        lines.append(f"| {budget} | {hit:.0%} | " + " | ".join(_f(group[m].ttft_mean_ms) if m in group else "-"
                                                             for m in methods)
                     + f" | {vs('recompute')} | {vs('kv')} |")
    return lines


def paper_lines(rows: list[RunSummary]) -> list[str]:
    lines = ["\n### Beside the paper\n", "| trace | ours: hcache vs kv | ours: hcache vs recompute | paper |",
             "|---|---|---|---|"]
    for trace in sorted({r.trace for r in rows if r.section == "rate"}):
        rate_rows = [r for r in rows if r.section == "rate" and r.trace == trace]
        spans = []
        for baseline in ("kv", "recompute"):
            g = [x for _, x in gains(rate_rows, baseline)]
            spans.append(f"{min(g):.2f}-{max(g):.2f}x" if g else "-")
        lines.append(f"| {trace} | {spans[0]} | {spans[1]} | {PAPER.get(trace, '-')} |")
    lines.append(f"| sensitivity | see above | | {PAPER['sensitivity']} |")
    return lines


def markdown(rows: list[RunSummary], header: str, pays: float, skipped: list[str] = ()) -> str:
    lines = ["# hcache serve-bench\n", header]
    lines += rate_table([r for r in rows if r.section == "rate"])
    lines += sensitivity_table(rows)
    notes = when_not_to_use(rows, pays)
    if notes:
        lines += ["\n### When not to use it\n"] + [f"- {n}" for n in notes]
    lines += paper_lines(rows)
    if skipped:
        lines += ["\n### Not run (time limit)\n"] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def console_table(rows: list[RunSummary], pays: float) -> str:
    """One line per trace, rate and budget: mean TTFT (ms) of every method side by side, and hcache's gains."""
    methods = [m for m in METHOD_ORDER if any(r.method == m for r in rows)]
    out = [f"{'trace':6} {'section':11} {'rate':>5} {'budget':>7} {'hit':>4} "
           + " ".join(f"{m:>10}" for m in methods) + f" {'vs rec':>7} {'vs kv':>6}   (mean TTFT ms)"]
    groups: dict[tuple, dict[str, RunSummary]] = {}
    for r in rows:
        groups.setdefault((r.section, r.trace, r.rate, r.gpu_budget_tokens), {})[r.method] = r
    for (section, trace, rate, budget), g in sorted(groups.items()):
        hit = sum(r.gpu_hit_ratio for r in g.values()) / len(g)
        hc = g.get("hcache")
        vs = [f"{g[b].ttft_mean_ms / hc.ttft_mean_ms:6.2f}x" if hc and b in g and hc.ttft_mean_ms else f"{'-':>7}"
              for b in ("recompute", "kv")]
        out.append(f"{trace:6} {section:11} {rate:5g} {budget:7d} {hit:4.0%} "
                   + " ".join(f"{g[m].ttft_mean_ms:10.1f}" if m in g else f"{'-':>10}" for m in methods)
                   + f" {vs[0]} {vs[1]}")
    out += when_not_to_use(rows, pays)
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots
def plot(rows: list[RunSummary], out: Path, pays: float) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots")
        return []
    written = []
    rate_rows = [r for r in rows if r.section == "rate"]
    traces = sorted({r.trace for r in rate_rows})
    if traces:
        fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4.2), squeeze=False)
        for ax, trace in zip(axes[0], traces):
            for m in METHOD_ORDER:
                pts = sorted((r.rate, r.ttft_mean_ms, r.ttft_p90_ms) for r in rate_rows
                             if r.trace == trace and r.method == m)
                if pts:
                    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{m} mean")
                    ax.plot([p[0] for p in pts], [p[2] for p in pts], ls=":", color=line.get_color(), alpha=0.7)
            ax.set_yscale("log")
            _label(ax, "request rate (req/s)", "TTFT ms (mean; dotted: p90)", f"{trace}: TTFT vs request rate")
        written.append(_save(plt, fig, out / "ttft_vs_rate.png"))
    sens = [r for r in rows if r.section == "sensitivity"]
    if sens:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for baseline in ("recompute", "kv"):
            pts = sorted((r.gpu_hit_ratio, g) for r, g in gains(sens, baseline))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"hcache vs {baseline}")
                h = crossing(pts, pays)
                if h is not None:
                    ax.axvline(h, ls=":", alpha=0.5)
        ax.axhline(pays, color="grey", ls="--", lw=1, label=f"{pays:.2f}x: pays")
        _label(ax, "GPU hit ratio", "TTFT gain (mean, baseline / hcache)", "gain vs GPU hit ratio (GPU budget swept)")
        written.append(_save(plt, fig, out / "gain_vs_hit_ratio.png"))
    return written


def _label(ax, x: str, y: str, title: str) -> None:
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

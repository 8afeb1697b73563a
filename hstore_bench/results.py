"""What `hstore bench` measured: its config, rows, targets, and how they are rendered (table, CSV).

Nothing prints here; the CLI renders a `BenchReport` (`format_report`, `write_csv`).
"""
from __future__ import annotations

import csv
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TextIO

from hstore.buffers import ALIGN, cuda_available
from hstore.units import MiB, KiB, format_size, human_bytes

TIERS = ("dram", "nvme", "gpu")
DEFAULT_SIZES = (256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)
TARGET_CHUNK = 512 * KiB
DRAM_TARGET_GBPS = 5.0
NVME_TARGET_RATIO = 0.90


@dataclass
class BenchConfig:
    root: Path
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    total: int = 512 * MiB
    tiers: list[str] = field(default_factory=lambda: list(TIERS))
    engine: str = "auto"
    queue_depth: int = 64
    repeat: int = 3
    batch_bytes: int = 64 * MiB
    """get_many_into batch of the restore path (and of the NVMe -> GPU pipeline)."""
    raw_block: int = 8 * MiB
    torch_threads: int | None = None
    """torch.set_num_threads for the run (None: leave it); the store's host copies use torch's intra-op pool."""

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError("sizes must be positive")
        self.sizes = sorted(set(self.sizes))
        if self.total < max(self.sizes):
            raise ValueError(f"total ({format_size(self.total)}) must be at least the largest chunk "
                             f"({format_size(max(self.sizes))})")
        if self.repeat < 1:
            raise ValueError("repeat must be at least 1")
        bad = [t for t in self.tiers if t not in TIERS]
        if bad:
            raise ValueError(f"unknown tier(s) {bad}; choose from {', '.join(TIERS)}")
        if self.engine not in ("auto", "uring", "threads"):
            raise ValueError(f"engine must be auto, uring or threads, not {self.engine!r}")
        if not 1 <= self.queue_depth <= 4096:
            raise ValueError("queue depth must be in 1..4096")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch threads must be at least 1")
        if self.raw_block <= 0 or self.raw_block % ALIGN:
            raise ValueError(f"raw block must be a positive multiple of {ALIGN}")


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


@dataclass
class BenchRow:
    """One tier at one chunk size: GB/s (1e9 bytes per second of payload) of every repetition."""

    tier: str
    chunk_bytes: int
    writes: list[float] = field(default_factory=list)
    reads: list[float] = field(default_factory=list)
    put_gets: list[float] = field(default_factory=list)
    ios: list[float] = field(default_factory=list)
    """NVMe: payload over the time the I/O engine was busy during the reads."""
    ref: str | None = None
    refs: list[float] = field(default_factory=list)
    note: str = ""

    write_gbps = property(lambda self: _median(self.writes))
    read_gbps = property(lambda self: _median(self.reads))
    put_get_gbps = property(lambda self: _median(self.put_gets))
    io_gbps = property(lambda self: _median(self.ios))
    ref_gbps = property(lambda self: _median(self.refs))

    @property
    def read_vs_ref(self) -> float | None:
        if self.read_gbps is None or not self.ref_gbps:
            return None
        return self.read_gbps / self.ref_gbps

    def summary(self) -> dict:
        """Medians and ratio (JSON-ready); the per-repetition lists sit beside them in `as_dict`."""
        return {"tier": self.tier, "chunk_bytes": self.chunk_bytes, "write_gbps": self.write_gbps,
                "read_gbps": self.read_gbps, "put_get_gbps": self.put_get_gbps, "io_gbps": self.io_gbps,
                "reference": self.ref, "ref_gbps": self.ref_gbps, "read_vs_ref": self.read_vs_ref,
                "repeats": max(map(len, (self.writes, self.reads, self.put_gets)), default=0), "note": self.note}

    def as_dict(self) -> dict:
        return {**self.summary(), "runs": {"write": self.writes, "read": self.reads, "put_get": self.put_gets,
                                           "io": self.ios, "ref": self.refs}}


@dataclass
class Target:
    name: str
    value: float | None
    goal: str
    met: bool | None  # None: no fixed goal, or nothing measured
    detail: str = ""


@dataclass
class BenchReport:
    config: BenchConfig
    host: dict
    rows: list[BenchRow] = field(default_factory=list)
    engine: str | None = None
    direct_io: bool | None = None
    seconds: float = 0.0
    targets: list[Target] = field(default_factory=list)

    def row(self, tier: str, chunk: int) -> BenchRow | None:
        return next((r for r in self.rows if r.tier == tier and r.chunk_bytes == chunk), None)


CSV_COLUMNS = ["tier", "chunk", "chunk_bytes", "write_gbps", "read_gbps", "put_get_gbps", "io_gbps",
               "reference", "ref_gbps", "read_vs_ref", "read_min_gbps", "read_max_gbps", "ref_min_gbps",
               "ref_max_gbps", "repeats", "engine", "note"]


def evaluate_targets(report: BenchReport) -> list[Target]:
    """The issue's targets, as measured in this run."""
    out = []
    dram = report.row("dram", TARGET_CHUNK)
    if dram is not None:
        v = dram.put_get_gbps
        out.append(Target("DRAM put+get, 512K chunks", v, f">= {DRAM_TARGET_GBPS:g} GB/s", v >= DRAM_TARGET_GBPS,
                          f"put {dram.write_gbps:.2f}, get {dram.read_gbps:.2f} GB/s"))
    nvme = [r for r in report.rows if r.tier == "nvme" and r.read_vs_ref is not None]
    if nvme:
        at = report.row("nvme", TARGET_CHUNK)
        main = at if at is not None and at.read_vs_ref is not None else min(nvme, key=lambda r: r.chunk_bytes)
        worst = min(nvme, key=lambda r: r.read_vs_ref)
        detail = (f"{main.read_gbps:.2f} vs {main.ref_gbps:.2f} GB/s; engine {report.engine}; "
                  f"lowest {worst.read_vs_ref:.2f} at {format_size(worst.chunk_bytes)}")
        raw = report.row("raw", report.config.raw_block)
        if raw is not None and len(raw.reads) > 1:
            detail += f"; raw reads ranged {min(raw.reads):.2f}-{max(raw.reads):.2f} GB/s over the run"
        if main.io_gbps:
            detail += f"; the store's reads spent {main.read_gbps / main.io_gbps:.0%} of their time in I/O"
        out.append(Target(f"NVMe read / raw O_DIRECT, {format_size(main.chunk_bytes)} chunks", main.read_vs_ref,
                          f">= {NVME_TARGET_RATIO:.2f}", main.read_vs_ref >= NVME_TARGET_RATIO, detail))
    pipe = report.row("nvme->gpu", TARGET_CHUNK) or next((r for r in report.rows if r.tier == "nvme->gpu"), None)
    if pipe is not None and pipe.read_vs_ref is not None:
        detail = f"{pipe.read_gbps:.2f} vs {pipe.ref_gbps:.2f} GB/s"
        disk = report.row("nvme", pipe.chunk_bytes)
        if disk is not None and disk.read_gbps:
            detail += (f"; NVMe -> pinned alone {disk.read_gbps:.2f} GB/s, so the GPU leg costs "
                       f"{max(0.0, 1 - pipe.read_gbps / disk.read_gbps):.0%} on top of the disk")
        out.append(Target(f"NVMe -> pinned -> GPU / pinned H2D, {format_size(pipe.chunk_bytes)} chunks",
                          pipe.read_vs_ref, "report", None, detail))
    elif "gpu" in report.config.tiers and "nvme" in report.config.tiers and not cuda_available():
        out.append(Target("NVMe -> pinned -> GPU / pinned H2D", None, "report", None, "not measured: CUDA unavailable"))
    return out


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _range(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else "-"


def format_report(report: BenchReport) -> str:
    cfg, h = report.config, report.host
    fs = h["fs"]
    dev = fs.get("source", "?")
    if "device_model" in fs:
        dev += f" ({fs['device_model']})"
    if fs.get("rotational") is not None:
        dev += ", rotational" if fs["rotational"] else ", non-rotational"
    gpu = h["gpu"]
    direct = {True: "yes", False: "no (buffered)", None: "-"}[report.direct_io]
    lines = [
        "hstore bench",
        f"  cpu      {h['cpu']}, {h['cores']} cores ({h['usable_cores']} usable), {human_bytes(h['ram_bytes'])} RAM",
        f"  system   Linux {h['kernel']}, Python {h['python']}, torch {h['torch']} ({h['torch_threads']} intra-op "
        f"threads), load average {_f(h['load_avg_1m'])} at start",
        f"  root     {h['root']} on {dev}, {fs.get('fstype', '?')} mounted at {fs.get('mount_point', '?')}, "
        f"{human_bytes(h['fs_free_bytes'])} free of {human_bytes(h['fs_total_bytes'])}",
        "  gpu      " + (f"{gpu['name']} ({human_bytes(gpu['memory_bytes'])}, sm {gpu['capability']}, "
                         f"CUDA {gpu['cuda']})" if gpu else "none (CUDA unavailable: GPU figures skipped)"),
        f"  io       engine {report.engine or '-'} (asked: {cfg.engine}), queue depth {cfg.queue_depth}, "
        f"O_DIRECT {direct}, restore batches of {format_size(cfg.batch_bytes)}",
        f"  run      {format_size(cfg.total)} per measurement, median of {cfg.repeat}, GB/s = 1e9 B/s of payload, "
        f"{report.seconds:.1f} s",
        "",
    ]
    header = ["tier", "chunk", "write GB/s", "read GB/s", "read range", "put+get GB/s", "I/O GB/s",
              "reference", "ref GB/s", "read/ref"]
    table = [header] + [
        [r.tier, format_size(r.chunk_bytes), _f(r.write_gbps), _f(r.read_gbps), _range(r.reads),
         _f(r.put_get_gbps), _f(r.io_gbps), r.ref or "-", _f(r.ref_gbps), _f(r.read_vs_ref)]
        for r in report.rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    left = {0, 7}
    for j, row in enumerate(table):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
        if j == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines += ["", "  put+get = bytes / (put time + get time); read/ref = read GB/s / the reference's GB/s"]
    seen: set[tuple[str, str]] = set()
    for r in report.rows:
        # one line per kind of note, not per chunk size (nor for a first row's extra remark)
        generic = re.sub(r"\d+(\.\d+)?", "#", r.note.split(";")[0])
        if r.note and (r.tier, generic) not in seen:
            seen.add((r.tier, generic))
            lines.append(f"  {r.tier}: {r.note}")
    if report.targets:
        lines += ["", "targets"]
        for t in report.targets:
            verdict = "n/a" if t.value is None else {True: "met", False: "MISSED", None: "measured"}[t.met]
            detail = f"  [{t.detail}]" if t.detail else ""
            lines.append(f"  {t.name}: {_f(t.value)} (goal {t.goal}): {verdict}{detail}")
    return "\n".join(lines)


def write_csv(report: BenchReport, out: TextIO) -> None:
    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    w = csv.writer(out)
    w.writerow(CSV_COLUMNS)
    for r in report.rows:
        s = r.summary()
        w.writerow([r.tier, format_size(r.chunk_bytes), r.chunk_bytes, num(r.write_gbps), num(r.read_gbps),
                    num(r.put_get_gbps), num(r.io_gbps), r.ref or "", num(r.ref_gbps), num(r.read_vs_ref),
                    num(min(r.reads, default=None)), num(max(r.reads, default=None)),
                    num(min(r.refs, default=None)), num(max(r.refs, default=None)),
                    s["repeats"], report.engine or "", r.note])

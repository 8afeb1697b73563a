"""`hstore bench`: what each tier delivers through the store's public API, next to what the hardware gives.

Every figure is a median over repetitions of moving `total` bytes in chunks of
one size, and each comes with the yardstick it should be judged against:

* DRAM tier: `put` then `get_into` of every chunk (a store with DRAM only, its
  arena warmed by one untimed pass); put+get = bytes / (put time + get time).
* NVMe tier: write = `put` of every chunk then `flush()` (two-stage saving to
  the end: the data is durable); read = `drop_cached()`, then `get_many_into`
  aligned (pinned where CUDA is) buffers in batches, promote=False: the
  restore path, every chunk read from the device and checksum-verified.
  Yardstick: plain synchronous O_DIRECT reads of 8 MiB from a file of `total`
  bytes in the same directory (`raw_sequential_read_gbps`), measured right
  after each store read so that a drifting virtual disk drifts for both.
* engine rows: the same raw file read through the bare I/O engine in ops of the
  chunk size (`engine_sequential_read_gbps`), to tell the engine's share of a
  shortfall from the store's.
* With CUDA: pinned host-to-device copies (the yardstick), the GPU tier (put
  of CUDA tensors, get_many_into CUDA buffers from GPU-resident items), and
  NVMe -> pinned DRAM -> GPU (reads into two pinned staging buffers, each
  copied to the GPU on a side stream while the next batch is read), timed
  with CUDA events.

Nothing prints here; the CLI renders `BenchReport` (`format_report`, `write_csv`).
Everything is written under a private directory in ROOT, removed at the end.
"""
from __future__ import annotations

import csv
import os
import platform
import re
import shutil
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import torch

from hstore.buffers import ALIGN, align_up, aligned_empty, cuda_available
from hstore.config import StoreConfig
from hstore.errors import HStoreError
from hstore.io import make_engine
from hstore.io.rawbench import engine_sequential_read_gbps, raw_sequential_read_gbps

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GB = 1e9
TIERS = ("dram", "nvme", "gpu")
DEFAULT_SIZES = (256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)
TARGET_CHUNK = 512 * KiB
DRAM_TARGET_GBPS = 5.0
NVME_TARGET_RATIO = 0.90
_POOL_BYTES = 64 * MiB  # source/destination rings: larger than any last-level cache
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}
_HEADER = ALIGN  # an NVMe record's header (hstore.record.HEADER_BYTES)


class BenchError(HStoreError):
    """The benchmark could not measure what it was asked to (a read failed, a chunk came back wrong)."""


# ---------------------------------------------------------------------------- sizes
def parse_size(text: str) -> int:
    """"512K", "8M", "1G", "1GiB", "4096" -> bytes (binary units). ValueError when malformed or not positive."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512K, 8M, 1G)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise ValueError(f"not a positive whole number of bytes: {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """Bytes in the shortest exact binary unit: 524288 -> "512K", 1073741824 -> "1G"."""
    for suffix, unit in (("T", 1 << 40), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for suffix, unit in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= unit:
            return f"{n / unit:.1f} {suffix}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------- config and results
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

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError("sizes must be positive")
        self.sizes = sorted(set(self.sizes))
        if self.total < max(self.sizes):
            raise ValueError(f"total ({format_size(self.total)}) must be at least the largest chunk ({format_size(max(self.sizes))})")
        if self.repeat < 1:
            raise ValueError("repeat must be at least 1")
        bad = [t for t in self.tiers if t not in TIERS]
        if bad:
            raise ValueError(f"unknown tier(s) {bad}; choose from {', '.join(TIERS)}")
        if self.engine not in ("auto", "uring", "threads"):
            raise ValueError(f"engine must be auto, uring or threads, not {self.engine!r}")
        if not 1 <= self.queue_depth <= 4096:
            raise ValueError("queue depth must be in 1..4096")
        if self.raw_block <= 0 or self.raw_block % ALIGN:
            raise ValueError(f"raw block must be a positive multiple of {ALIGN}")


@dataclass
class BenchRow:
    """One tier at one chunk size. GB/s are 1e9 bytes per second of payload, medians over repetitions."""

    tier: str
    chunk_bytes: int
    write_gbps: float | None = None
    read_gbps: float | None = None
    put_get_gbps: float | None = None
    ref: str | None = None
    ref_gbps: float | None = None
    repeats: int = 0
    note: str = ""

    @property
    def read_vs_ref(self) -> float | None:
        if self.read_gbps is None or not self.ref_gbps:
            return None
        return self.read_gbps / self.ref_gbps


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


CSV_COLUMNS = ["tier", "chunk", "chunk_bytes", "write_gbps", "read_gbps", "put_get_gbps",
               "reference", "ref_gbps", "read_vs_ref", "repeats", "engine", "note"]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------- the host
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _mount_of(path: Path) -> dict:
    """Mount point, filesystem type and source device of `path` (from /proc/self/mountinfo)."""
    path = path.resolve()
    best: dict = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(fields) < 5 or len(rfields) < 2:
                    continue
                mnt = fields[4].replace("\\040", " ")
                if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best.get("mount_point", "")):
                    best = {"mount_point": mnt, "fstype": rfields[0], "source": rfields[1]}
    except OSError:
        pass
    src = best.get("source", "")
    if src.startswith("/dev/"):
        block = Path("/sys/class/block") / Path(src).name
        for d in (block, block.resolve().parent):
            model = d / "device" / "model"
            if model.is_file():
                best["device_model"] = model.read_text().strip()
                break
        for d in (block, block.resolve().parent):
            rot = d / "queue" / "rotational"
            if rot.is_file():
                best["rotational"] = rot.read_text().strip() == "1"
                break
    return best


def describe_host(root: Path) -> dict:
    """CPU, cores, RAM, the filesystem and device under `root`, the GPU if any, software versions."""
    usage = shutil.disk_usage(root)
    gpu = None
    if cuda_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
               "cuda": torch.version.cuda}
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "root": str(root.resolve()),
        "fs": _mount_of(root),
        "fs_free_bytes": usage.free,
        "fs_total_bytes": usage.total,
        "gpu": gpu,
    }


# ---------------------------------------------------------------------------- measurements
class _Pool:
    """A ring of chunk-sized slices over one aligned buffer (pinned where CUDA is)."""

    def __init__(self, chunk: int, *, device: str = "cpu", random: bool = False):
        self.chunk = chunk
        self.slots = max(1, _POOL_BYTES // chunk)
        nbytes = self.slots * chunk
        if device == "cpu":
            self.buf = aligned_empty(nbytes)
        else:
            self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        if random:
            self.buf.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8).to(self.buf.device))
        else:
            self.buf.zero_()  # fault the pages in now, not inside a timed loop

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.buf.narrow(0, (i % self.slots) * self.chunk, self.chunk)


def _keys(chunk: int, n: int) -> list[str]:
    return [f"bench/{chunk}/{i}" for i in range(n)]


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else float("inf")


def _write_raw_file(path: Path, total: int, block: int) -> float:
    """Write `total` bytes with O_DIRECT in `block` writes, fdatasync; GB/s."""
    buf = aligned_empty(block, pin=False)
    buf.copy_(torch.randint(0, 256, (block,), dtype=torch.uint8))
    view = memoryview(buf.numpy())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        start = time.perf_counter()
        done = 0
        while done < total:
            n = min(block, align_up(total - done))
            done += os.pwritev(fd, [view[:n]], done)
        os.fdatasync(fd)
        return _gbps(done, time.perf_counter() - start)
    finally:
        os.close(fd)


class _Runner:
    """Holds what the steps share: the work directory, the raw file, open stores."""

    def __init__(self, cfg: BenchConfig, report: BenchReport):
        self.cfg = cfg
        self.report = report
        self.work = cfg.root / f".hstore-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.raw_path = self.work / "raw.bin"
        self.raw_ok = False
        self.raw_note = ""
        self.raw_write: float | None = None
        self.raw_reads: list[float] = []
        self.cuda = cuda_available()
        self.h2d: dict[int, float] = {}
        self.dram_store = None
        self.cold_put: float | None = None

    # -- raw reference -------------------------------------------------------------
    def write_raw(self) -> None:
        try:
            self.raw_write = _write_raw_file(self.raw_path, self.cfg.total, self.cfg.raw_block)
            self.raw_ok = True
        except OSError as e:  # tmpfs and some FUSE filesystems refuse O_DIRECT
            self.raw_note = f"raw O_DIRECT unavailable: {e.strerror or e}"

    def raw_read(self) -> float | None:
        if not self.raw_ok:
            return None
        g = raw_sequential_read_gbps(str(self.raw_path), self.cfg.raw_block, self.cfg.total)
        self.raw_reads.append(g)
        return g

    def raw_row(self) -> None:
        if not self.raw_ok:
            self.report.rows.append(BenchRow("raw", self.cfg.raw_block, note=self.raw_note))
            return
        self.report.rows.append(BenchRow(
            "raw", self.cfg.raw_block, write_gbps=self.raw_write, read_gbps=_median(self.raw_reads),
            repeats=len(self.raw_reads), note="sync O_DIRECT pwritev/preadv; write includes fdatasync",
        ))

    def engine_read(self, chunk: int) -> None:
        if not self.raw_ok:
            return
        cfg = self.cfg
        reads, refs = [], []
        with make_engine(cfg.engine, queue_depth=cfg.queue_depth, workers=StoreConfig.io_threads) as engine:
            name = engine.name
            for _ in range(cfg.repeat):
                reads.append(engine_sequential_read_gbps(engine, str(self.raw_path), chunk, cfg.total))
                refs.append(self.raw_read())
        self.report.rows.append(BenchRow(
            f"engine:{name}", chunk, read_gbps=_median(reads), ref=f"raw O_DIRECT {format_size(cfg.raw_block)}",
            ref_gbps=_median(refs), repeats=cfg.repeat, note=f"bare engine, one batch of {format_size(chunk)} ops, QD {cfg.queue_depth}",
        ))

    # -- DRAM tier -----------------------------------------------------------------
    def dram(self, chunk: int) -> None:
        from hstore.store import TieredStore

        cfg = self.cfg
        n = max(1, cfg.total // chunk)
        nbytes = n * chunk
        if self.dram_store is None:
            largest = max(set(cfg.sizes) | {TARGET_CHUNK})
            arena = align_up(cfg.total + 4 * largest) + 16 * MiB
            self.dram_store = TieredStore(StoreConfig(root=self.work / "dram", dram_bytes=arena, nvme_bytes=0))
        store = self.dram_store
        for k in store.keys():
            store.delete(k)
        src, dst = _Pool(chunk, random=True), _Pool(chunk)
        keys = _keys(chunk, n)

        def put_all() -> float:
            t = time.perf_counter()
            for i, k in enumerate(keys):
                store.put(k, src[i])
            return time.perf_counter() - t

        def get_all() -> float:
            t = time.perf_counter()
            for i, k in enumerate(keys):
                if not store.get_into(k, dst[i]):
                    raise BenchError(f"DRAM get of {k} missed")
            return time.perf_counter() - t

        cold = put_all()  # untimed warm-up: faults the arena's pages in
        if self.cold_put is None:
            self.cold_put = _gbps(nbytes, cold)
        get_all()
        if not torch.equal(dst[n - 1], src[n - 1]):
            raise BenchError("DRAM get returned different bytes than were put")
        w, r, c = [], [], []
        for _ in range(cfg.repeat):
            tp, tg = put_all(), get_all()
            w.append(_gbps(nbytes, tp))
            r.append(_gbps(nbytes, tg))
            c.append(_gbps(nbytes, tp + tg))
        note = "put, get_into; DRAM-only store, arena warmed"
        if chunk == min(set(cfg.sizes) | {TARGET_CHUNK}) and self.cold_put is not None:
            note += f"; first pass into a cold arena: put {self.cold_put:.2f} GB/s"
        self.report.rows.append(BenchRow("dram", chunk, write_gbps=_median(w), read_gbps=_median(r),
                                         put_get_gbps=_median(c), repeats=cfg.repeat, note=note))

    def close_dram(self) -> None:
        if self.dram_store is not None:
            self.dram_store.close()
            self.dram_store = None

    # -- NVMe tier -----------------------------------------------------------------
    def nvme(self, chunk: int, with_gpu: bool) -> None:
        from hstore.store import TieredStore

        cfg = self.cfg
        n = max(1, cfg.total // chunk)
        nbytes = n * chunk
        footprint = n * (_HEADER + align_up(chunk))
        flush_batch = StoreConfig.flush_batch_bytes
        store_cfg = StoreConfig(
            root=self.work / f"nvme-{chunk}",
            # Smaller than `total` (from 256 MiB on), so puts also wait on the flusher as they would in service.
            dram_bytes=align_up(min(nbytes, 256 * MiB) + 2 * align_up(chunk)) + 8 * MiB,
            nvme_bytes=align_up(2 * footprint + 2 * flush_batch + 2 * (_HEADER + align_up(chunk))),
            io_engine=cfg.engine, queue_depth=cfg.queue_depth,
        )
        src = _Pool(chunk, random=True)
        per_batch = max(1, cfg.batch_bytes // align_up(chunk))
        outs = aligned_empty(per_batch * align_up(chunk))
        out_views = [outs.narrow(0, j * align_up(chunk), chunk) for j in range(per_batch)]
        keys = _keys(chunk, n)
        w, r, refs, ratios = [], [], [], []
        from_nvme = True
        with TieredStore(store_cfg) as store:
            self.report.engine = store.stats()["io_engine"]
            self.report.direct_io = all(d.direct for d in store.nvme.devices)
            for _ in range(cfg.repeat):
                t = time.perf_counter()
                for i, k in enumerate(keys):
                    store.put(k, src[i])
                store.flush()
                w.append(_gbps(nbytes, time.perf_counter() - t))
                store.drop_cached()
                where = store.locate(keys)
                from_nvme = from_nvme and all(x == "nvme" for x in where)
                t = time.perf_counter()
                for b in range(0, n, per_batch):
                    ks = keys[b : b + per_batch]
                    found = store.get_many_into(ks, out_views[: len(ks)], promote=False)
                    if not all(found):
                        raise BenchError(f"{found.count(False)} NVMe read(s) of {format_size(chunk)} chunks failed")
                r.append(_gbps(nbytes, time.perf_counter() - t))
                if not torch.equal(out_views[(len(ks) - 1)], src[n - 1]):
                    raise BenchError("NVMe read returned different bytes than were put")
                ref = self.raw_read()
                if ref:
                    refs.append(ref)
                    ratios.append(r[-1] / ref)
            if with_gpu:
                self._nvme_to_gpu(store, chunk, keys, per_batch)
        shutil.rmtree(store_cfg.root, ignore_errors=True)
        note = f"put+flush; drop_cached, get_many_into {format_size(per_batch * chunk)} batches, promote=False"
        if not from_nvme:
            note += "; WARNING: some reads were served from memory"
        row = BenchRow("nvme", chunk, write_gbps=_median(w), read_gbps=_median(r),
                       ref=f"raw O_DIRECT {format_size(cfg.raw_block)}" if refs else None,
                       ref_gbps=_median(refs), repeats=cfg.repeat, note=note)
        self.report.rows.append(row)

    # -- GPU -------------------------------------------------------------------------
    def _event_seconds(self, fn, stream=None) -> float:
        stream = stream or torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def h2d(self, chunk: int) -> None:
        cfg = self.cfg
        n = max(1, cfg.total // chunk)
        src, dst = _Pool(chunk, random=True), _Pool(chunk, device="cuda")

        def copies():
            for i in range(n):
                dst[i].copy_(src[i], non_blocking=True)

        copies()
        torch.cuda.synchronize()
        runs = [_gbps(n * chunk, self._event_seconds(copies)) for _ in range(cfg.repeat)]
        self.h2d[chunk] = _median(runs)
        self.report.rows.append(BenchRow("h2d", chunk, read_gbps=self.h2d[chunk], repeats=cfg.repeat,
                                         note="pinned host -> GPU copy_(non_blocking), CUDA events"))

    def gpu_tier(self, chunk: int) -> None:
        from hstore.store import TieredStore

        cfg = self.cfg
        n = max(1, cfg.total // chunk)
        nbytes = n * chunk
        room = align_up(nbytes + 4 * align_up(chunk)) + 16 * MiB
        src, dst = _Pool(chunk, device="cuda", random=True), _Pool(chunk, device="cuda")
        keys = _keys(chunk, n)
        with TieredStore(StoreConfig(root=self.work / f"gpu-{chunk}", dram_bytes=room, gpu_bytes=room,
                                     nvme_bytes=0, pin_dram=True)) as store:
            def put_all():
                for i, k in enumerate(keys):
                    store.put(k, src[i])

            def get_all():
                for b in range(0, n, 64):
                    ks = keys[b : b + 64]
                    if not all(store.get_many_into(ks, [dst[b + j] for j in range(len(ks))])):
                        raise BenchError("GPU-tier read missed")

            put_all()
            get_all()  # promotes every item into the GPU tier
            where = store.locate(keys)
            w, r = [], []
            for _ in range(cfg.repeat):
                w.append(_gbps(nbytes, self._event_seconds(put_all)))
                get_all()  # the new puts landed in DRAM: promote them again
                r.append(_gbps(nbytes, self._event_seconds(get_all)))
            where = store.locate(keys)
        shutil.rmtree(self.work / f"gpu-{chunk}", ignore_errors=True)
        resident = sum(x == "gpu" for x in where)
        self.report.rows.append(BenchRow(
            "gpu", chunk, write_gbps=_median(w), read_gbps=_median(r), repeats=cfg.repeat,
            ref="pinned H2D" if chunk in self.h2d else None, ref_gbps=self.h2d.get(chunk),
            note=f"put(cuda tensor) lands in pinned DRAM; reads from GPU tier ({resident}/{n} resident)",
        ))

    def _nvme_to_gpu(self, store, chunk: int, keys: list[str], per_batch: int) -> None:
        """NVMe -> two pinned staging buffers -> GPU on a side stream, overlapped with the next read."""
        cfg = self.cfg
        n = len(keys)
        nbytes = n * chunk
        slot_bytes = per_batch * align_up(chunk)
        staging = [aligned_empty(slot_bytes, pin=True) for _ in range(2)]
        views = [[s.narrow(0, j * align_up(chunk), chunk) for j in range(per_batch)] for s in staging]
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()

        def pipeline():
            done = [None, None]
            for bi, b in enumerate(range(0, n, per_batch)):
                s = bi % 2
                if done[s] is not None:
                    done[s].synchronize()  # never overwrite staging still being copied
                ks = keys[b : b + per_batch]
                if not all(store.get_many_into(ks, views[s][: len(ks)], promote=False)):
                    raise BenchError("NVMe -> GPU read failed")
                with torch.cuda.stream(stream):
                    for j in range(len(ks)):  # one copy per chunk: chunks are not contiguous in staging
                        dst.narrow(0, (b + j) * chunk, chunk).copy_(views[s][j], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                done[s] = ev

        def direct():
            for b in range(0, n, per_batch):
                ks = keys[b : b + per_batch]
                outs = [dst.narrow(0, (b + j) * chunk, chunk) for j in range(len(ks))]
                if not all(store.get_many_into(ks, outs, promote=False)):
                    raise BenchError("NVMe -> GPU read failed")

        for name, fn, note in (
            ("nvme->gpu", pipeline, "NVMe -> pinned staging (2 slots) -> GPU on a side stream, overlapped"),
            ("nvme->gpu:direct", direct, "get_many_into CUDA buffers (the store bounces through pinned memory)"),
        ):
            runs = []
            for _ in range(cfg.repeat):
                store.drop_cached()
                torch.cuda.synchronize()
                runs.append(_gbps(nbytes, self._event_seconds(fn, stream)))
            if not torch.equal(dst.narrow(0, 0, chunk).cpu(), store.get(keys[0]).view(-1)):
                raise BenchError("NVMe -> GPU returned different bytes than were put")
            self.report.rows.append(BenchRow(name, chunk, read_gbps=_median(runs),
                                             ref="pinned H2D" if chunk in self.h2d else None,
                                             ref_gbps=self.h2d.get(chunk), repeats=cfg.repeat, note=note))

    def cleanup(self) -> None:
        self.close_dram()
        shutil.rmtree(self.work, ignore_errors=True)


def plan(cfg: BenchConfig) -> list[tuple[str, Callable[[_Runner], None]]]:
    """The benchmark's steps, in order (so a progress bar knows how many there are)."""
    cuda = cuda_available()
    want_gpu = cuda and "gpu" in cfg.tiers
    steps: list[tuple[str, Callable[[_Runner], None]]] = []
    if "nvme" in cfg.tiers:
        steps.append(("raw O_DIRECT write", _Runner.write_raw))
        for c in cfg.sizes:
            steps.append((f"engine {format_size(c)}", lambda r, c=c: r.engine_read(c)))
    if want_gpu:
        for c in cfg.sizes:
            steps.append((f"h2d {format_size(c)}", lambda r, c=c: r.h2d(c)))
    if "dram" in cfg.tiers:
        for c in sorted(set(cfg.sizes) | {TARGET_CHUNK}):
            steps.append((f"dram {format_size(c)}", lambda r, c=c: r.dram(c)))
        steps.append(("dram done", _Runner.close_dram))
    if "nvme" in cfg.tiers:
        for c in cfg.sizes:
            steps.append((f"nvme {format_size(c)}", lambda r, c=c: r.nvme(c, with_gpu=want_gpu)))
        steps.append(("raw summary", _Runner.raw_row))
    if want_gpu:
        for c in cfg.sizes:
            steps.append((f"gpu {format_size(c)}", lambda r, c=c: r.gpu_tier(c)))
    return steps


def run_bench(cfg: BenchConfig, progress: Callable[[int, int, str], None] | None = None) -> BenchReport:
    """Run every step of `plan(cfg)`; `progress(done, total, label)` after each. Cleans up what it wrote."""
    created = not cfg.root.exists()
    cfg.root.mkdir(parents=True, exist_ok=True)
    report = BenchReport(cfg, describe_host(cfg.root))
    runner = _Runner(cfg, report)
    runner.work.mkdir()
    steps = plan(cfg)
    start = time.perf_counter()
    try:
        for i, (label, step) in enumerate(steps):
            if progress is not None:
                progress(i, len(steps), label)
            step(runner)
        if progress is not None:
            progress(len(steps), len(steps), "done")
    finally:
        runner.cleanup()
        if created:
            shutil.rmtree(cfg.root, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    report.targets = evaluate_targets(report)
    return report


def evaluate_targets(report: BenchReport) -> list[Target]:
    """The issue's targets, as measured in this run."""
    out = []
    dram = report.row("dram", TARGET_CHUNK)
    if dram is not None:
        v = dram.put_get_gbps
        out.append(Target("DRAM put+get, 512K chunks", v, f">= {DRAM_TARGET_GBPS:g} GB/s",
                          None if v is None else v >= DRAM_TARGET_GBPS, f"put {dram.write_gbps:.2f}, get {dram.read_gbps:.2f} GB/s"))
    nvme = [r for r in report.rows if r.tier == "nvme" and r.read_vs_ref is not None]
    if nvme:
        at = report.row("nvme", TARGET_CHUNK)
        worst = min(nvme, key=lambda r: r.read_vs_ref)
        main = at if at is not None and at.read_vs_ref is not None else worst
        detail = f"lowest {worst.read_vs_ref:.2f} at {format_size(worst.chunk_bytes)}; engine {report.engine}"
        out.append(Target(f"NVMe read / raw O_DIRECT, {format_size(main.chunk_bytes)} chunks", main.read_vs_ref,
                          f">= {NVME_TARGET_RATIO:.2f}", main.read_vs_ref >= NVME_TARGET_RATIO, detail))
    pipe = report.row("nvme->gpu", TARGET_CHUNK) or next((r for r in report.rows if r.tier == "nvme->gpu"), None)
    if pipe is not None and pipe.read_vs_ref is not None:
        out.append(Target(f"NVMe -> pinned -> GPU / pinned H2D, {format_size(pipe.chunk_bytes)} chunks", pipe.read_vs_ref,
                          "report", None, f"{pipe.read_gbps:.2f} vs {pipe.ref_gbps:.2f} GB/s"))
    elif "gpu" in report.config.tiers and not cuda_available():
        out.append(Target("NVMe -> pinned -> GPU / pinned H2D", None, "report", None, "not measured: CUDA unavailable"))
    return out


# ---------------------------------------------------------------------------- rendering
def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_report(report: BenchReport) -> str:
    cfg, h = report.config, report.host
    fs = h["fs"]
    dev = fs.get("source", "?")
    if "device_model" in fs:
        dev += f" ({fs['device_model']})"
    if fs.get("rotational") is not None:
        dev += ", rotational" if fs["rotational"] else ", non-rotational"
    gpu = h["gpu"]
    lines = [
        "hstore bench",
        f"  cpu      {h['cpu']}, {h['cores']} cores ({h['usable_cores']} usable), {human_bytes(h['ram_bytes'])} RAM",
        f"  system   Linux {h['kernel']}, Python {h['python']}, torch {h['torch']}",
        f"  root     {h['root']} on {dev}, {fs.get('fstype', '?')} mounted at {fs.get('mount_point', '?')}, "
        f"{human_bytes(h['fs_free_bytes'])} free of {human_bytes(h['fs_total_bytes'])}",
        f"  gpu      " + (f"{gpu['name']} ({human_bytes(gpu['memory_bytes'])}, sm {gpu['capability']}, CUDA {gpu['cuda']})"
                          if gpu else "none (CUDA unavailable: GPU figures skipped)"),
        f"  io       engine {report.engine or cfg.engine}, queue depth {cfg.queue_depth}, "
        f"O_DIRECT {'yes' if report.direct_io else 'no' if report.direct_io is False else '-'}, "
        f"restore batches of {format_size(cfg.batch_bytes)}",
        f"  run      {format_size(cfg.total)} per measurement, median of {cfg.repeat}, GB/s = 1e9 B/s of payload, "
        f"{report.seconds:.1f} s",
        "",
    ]
    header = ["tier", "chunk", "write GB/s", "read GB/s", "put+get GB/s", "reference", "ref GB/s", "read/ref"]
    table = [header]
    for r in report.rows:
        table.append([r.tier, format_size(r.chunk_bytes), _f(r.write_gbps), _f(r.read_gbps), _f(r.put_get_gbps),
                      r.ref or "-", _f(r.ref_gbps), _f(r.read_vs_ref)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) if i not in (5,) else c.ljust(w)
                                             for i, (c, w) in enumerate(zip(row[1:], widths[1:]), start=1)]
        lines.append("  " + "  ".join(cells).rstrip())
        if j == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines += ["", "  put+get = bytes / (put time + get time); read/ref = read GB/s / the reference's GB/s"]
    notes = [(r.tier, r.chunk_bytes, r.note) for r in report.rows if r.note]
    seen = set()
    for tier, chunk, note in notes:
        generic = re.sub(r"\d+(\.\d+)? GB/s", "", note)
        if (tier, generic) in seen and "first pass" not in note and "WARNING" not in note:
            continue
        seen.add((tier, generic))
        lines.append(f"  {tier}: {note}")
    if report.targets:
        lines += ["", "targets"]
        for t in report.targets:
            verdict = "n/a" if t.value is None else ("met" if t.met else "MISSED" if t.met is False else "measured")
            value = "-" if t.value is None else f"{t.value:.2f}"
            lines.append(f"  {t.name}: {value} (goal {t.goal}): {verdict}" + (f"  [{t.detail}]" if t.detail else ""))
    return "\n".join(lines)


def write_csv(report: BenchReport, out: TextIO) -> None:
    w = csv.writer(out)
    w.writerow(CSV_COLUMNS)
    for r in report.rows:
        w.writerow([r.tier, format_size(r.chunk_bytes), r.chunk_bytes,
                    *("" if x is None else f"{x:.4f}" for x in (r.write_gbps, r.read_gbps, r.put_get_gbps)),
                    r.ref or "", "" if r.ref_gbps is None else f"{r.ref_gbps:.4f}",
                    "" if r.read_vs_ref is None else f"{r.read_vs_ref:.4f}", r.repeats, report.engine or "", r.note])

"""`hstore bench`: what each tier delivers through the store's public API, next to what the hardware gives.

Every figure is a median over repetitions of moving `total` bytes in chunks of
one size, and each comes with the yardstick it should be judged against:

* DRAM tier: `put` then `get_into` of every chunk (a store with DRAM only, its
  arena warmed by one untimed pass); put+get = bytes / (put time + get time).
* NVMe tier: write = `put` of every chunk then `flush()` (two-stage saving to
  the end: the data is durable); read = `drop_cached()`, then `get_many_into`
  aligned (pinned where CUDA is) buffers in batches, promote=False: the
  restore path, every chunk read from the device and checksum-verified.
  "I/O GB/s" is the payload over the time the I/O engine itself was busy
  during those reads: read/I/O is the share the tier's CPU work (header, key
  and checksum checks, Python) leaves to the device.
  Yardstick: plain synchronous O_DIRECT reads of 8 MiB from a file of `total`
  bytes in the same directory (`raw_sequential_read_gbps`). In every
  repetition the file is rewritten after the store's flush and read right
  after the store's read, so both reads find their data equally fresh (a
  virtual disk may serve recent data from the host's cache, much faster than
  the device) and a drifting, shared disk drifts for both.
* With CUDA: pinned host-to-device copies (the yardstick), the GPU tier (put
  of CUDA tensors, get_many_into CUDA buffers from GPU-resident items), and
  NVMe -> pinned DRAM -> GPU (reads into two pinned staging buffers, each
  copied to the GPU on a side stream while the next batch is read; and the
  store's own path, get_many_into CUDA buffers), timed with CUDA events.

Nothing prints here; the CLI renders a `BenchReport` (`format_report`, `write_csv`).
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
from typing import Callable, Sequence, TextIO

import torch

from hstore.buffers import ALIGN, align_up, aligned_empty, cuda_available
from hstore.config import StoreConfig
from hstore.errors import HStoreError
from hstore.io.engine import IoEngine, IoOp
from hstore.io.rawbench import raw_sequential_read_gbps
from hstore.record import HEADER_BYTES

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GB = 1e9
TIERS = ("dram", "nvme", "gpu")
DEFAULT_SIZES = (256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)
TARGET_CHUNK = 512 * KiB
DRAM_TARGET_GBPS = 5.0
NVME_TARGET_RATIO = 0.90
_POOL_BYTES = 64 * MiB  # source/destination rings: larger than any last-level cache
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}


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
    """Bytes in the largest exact binary unit: 524288 -> "512K", 1073741824 -> "1G"."""
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
        for d in (block, block.resolve().parent):  # a partition's queue and model live on its disk
            if "device_model" not in best and (d / "device" / "model").is_file():
                best["device_model"] = (d / "device" / "model").read_text().strip()
            if "rotational" not in best and (d / "queue" / "rotational").is_file():
                best["rotational"] = (d / "queue" / "rotational").read_text().strip() == "1"
    return best


def describe_host(root: Path) -> dict:
    """CPU, cores, RAM, the filesystem and device under `root`, the GPU if any, software versions, load."""
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
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
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
    """A ring of chunk-sized slices over one buffer (aligned and, where CUDA is, pinned; or on the GPU)."""

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


class _TimedEngine(IoEngine):
    """Wraps the NVMe tier's engine to add up the time spent in read batches (the device's share of a read)."""

    def __init__(self, inner: IoEngine):
        self.inner = inner
        self.name = inner.name
        self.read_seconds = 0.0

    def run(self, ops: Sequence[IoOp]) -> list[int]:
        start = time.perf_counter()
        try:
            return self.inner.run(ops)
        finally:
            if not any(op.write for op in ops):
                self.read_seconds += time.perf_counter() - start

    def fsync(self, fd: int) -> int:
        return self.inner.fsync(fd)

    def close(self) -> None:
        self.inner.close()


def _keys(chunk: int, n: int) -> list[str]:
    return [f"bench/{chunk}/{i}" for i in range(n)]


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else float("inf")


def _write_raw_file(path: Path, total: int, block: int) -> float:
    """Write `total` bytes with O_DIRECT in `block` writes, then fdatasync; GB/s."""
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


def _event_seconds(fn: Callable[[], None], stream=None) -> float:
    """Seconds from before `fn` until the GPU work it queued on `stream` has finished (CUDA events)."""
    stream = stream or torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


class _Runner:
    """What the steps share: the work directory, the raw file and its readings, the DRAM store."""

    def __init__(self, cfg: BenchConfig, report: BenchReport):
        self.cfg = cfg
        self.report = report
        self.work = cfg.root / f".hstore-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.raw = BenchRow("raw", cfg.raw_block)
        self.raw_path = self.work / "raw.bin"
        self.raw_error = ""
        self.h2d_runs: dict[int, list[float]] = {}  # pinned H2D GB/s per chunk size: the GPU rows' yardstick
        self.dram_store = None
        self.cold_put: float | None = None

    # -- raw yardstick -------------------------------------------------------------
    def raw_measure(self) -> float | None:
        """Rewrite the raw file (O_DIRECT, fdatasync) and read it back; the read's GB/s (None without O_DIRECT)."""
        if self.raw_error:
            return None
        try:
            self.raw.writes.append(_write_raw_file(self.raw_path, self.cfg.total, self.cfg.raw_block))
            g = raw_sequential_read_gbps(str(self.raw_path), self.cfg.raw_block, self.cfg.total)
        except OSError as e:  # tmpfs and some FUSE filesystems refuse O_DIRECT
            self.raw_error = f"raw O_DIRECT unavailable here: {e.strerror or e}"
            return None
        self.raw.reads.append(g)
        return g

    def raw_row(self) -> None:
        self.raw.note = self.raw_error or (
            f"sync O_DIRECT pwrite+fdatasync / preadv of {format_size(self.cfg.raw_block)}, one at a time (QD 1); "
            "rewritten and read once per NVMe repetition, its read right after the store's")
        self.report.rows.append(self.raw)

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
        row = BenchRow("dram", chunk, note="put, then get_into a ring of buffers, one call per chunk; DRAM-only "
                                           "store, arena warmed by one untimed pass")
        for _ in range(cfg.repeat):
            tp, tg = put_all(), get_all()
            row.writes.append(_gbps(nbytes, tp))
            row.reads.append(_gbps(nbytes, tg))
            row.put_gets.append(_gbps(nbytes, tp + tg))
        if not any(r.tier == "dram" for r in self.report.rows):
            row.note += f"; the untimed pass into a cold arena put at {self.cold_put:.2f} GB/s"
        self.report.rows.append(row)

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
        record = HEADER_BYTES + align_up(chunk)
        store_cfg = StoreConfig(
            root=self.work / f"nvme-{chunk}",
            # Smaller than `total` (from 256 MiB on), so puts also wait on the flusher as they would in service.
            dram_bytes=align_up(min(nbytes, 256 * MiB) + 2 * align_up(chunk)) + 8 * MiB,
            # Room for two generations: a repetition's puts replace the last one's records only once flushed.
            nvme_bytes=align_up(2 * n * record + 2 * StoreConfig.flush_batch_bytes + 2 * record),
            io_engine=cfg.engine, queue_depth=cfg.queue_depth,
        )
        src = _Pool(chunk, random=True)
        per_batch = max(1, cfg.batch_bytes // align_up(chunk))
        outs = aligned_empty(per_batch * align_up(chunk))
        out_views = [outs.narrow(0, j * align_up(chunk), chunk) for j in range(per_batch)]
        keys = _keys(chunk, n)
        row = BenchRow("nvme", chunk, note=f"put+flush; drop_cached, get_many_into {format_size(per_batch * chunk)} "
                                           "batches, promote=False; I/O = time inside the engine")
        try:
            with TieredStore(store_cfg) as store:
                self.report.engine = store.stats()["io_engine"]
                self.report.direct_io = all(d.direct for d in store.nvme.devices)
                timed = store.nvme.engine = _TimedEngine(store.nvme.engine)
                for _ in range(cfg.repeat):
                    t = time.perf_counter()
                    for i, k in enumerate(keys):
                        store.put(k, src[i])
                    store.flush()
                    row.writes.append(_gbps(nbytes, time.perf_counter() - t))
                    store.drop_cached()
                    if any(where != "nvme" for where in store.locate(keys)):
                        raise BenchError("drop_cached left copies in memory: the reads would not come from NVMe")
                    timed.read_seconds = 0.0
                    t = time.perf_counter()
                    for b in range(0, n, per_batch):
                        ks = keys[b : b + per_batch]
                        found = store.get_many_into(ks, out_views[: len(ks)], promote=False)
                        if not all(found):
                            raise BenchError(f"{found.count(False)} NVMe read(s) of {format_size(chunk)} chunks failed")
                    row.reads.append(_gbps(nbytes, time.perf_counter() - t))
                    row.ios.append(_gbps(nbytes, timed.read_seconds))
                    if not torch.equal(out_views[len(ks) - 1], src[n - 1]):
                        raise BenchError("NVMe read returned different bytes than were put")
                    ref = self.raw_measure()  # the yardstick, as fresh as the store's data
                    if ref is not None:
                        row.refs.append(ref)
                if with_gpu:
                    self._nvme_to_gpu(store, chunk, keys, per_batch)
        finally:
            shutil.rmtree(store_cfg.root, ignore_errors=True)
        if row.refs:
            row.ref = f"raw O_DIRECT {format_size(cfg.raw_block)}"
        self.report.rows.append(row)

    # -- GPU -------------------------------------------------------------------------
    def _h2d_ref(self, row: BenchRow) -> None:
        if row.chunk_bytes in self.h2d_runs:
            row.ref, row.refs = "pinned H2D", list(self.h2d_runs[row.chunk_bytes])

    def h2d(self, chunk: int) -> None:
        cfg = self.cfg
        n = max(1, cfg.total // chunk)
        src, dst = _Pool(chunk, random=True), _Pool(chunk, device="cuda")

        def copies():
            for i in range(n):
                dst[i].copy_(src[i], non_blocking=True)

        copies()
        torch.cuda.synchronize()
        row = BenchRow("h2d", chunk, note="pinned host -> GPU copy_(non_blocking), one per chunk, CUDA events")
        row.reads = [_gbps(n * chunk, _event_seconds(copies)) for _ in range(cfg.repeat)]
        self.h2d_runs[chunk] = row.reads
        self.report.rows.append(row)

    def gpu_tier(self, chunk: int) -> None:
        from hstore.store import TieredStore

        cfg = self.cfg
        n = max(1, cfg.total // chunk)
        nbytes = n * chunk
        room = align_up(nbytes + 4 * align_up(chunk)) + 16 * MiB
        src, dst = _Pool(chunk, device="cuda", random=True), _Pool(chunk, device="cuda")
        keys = _keys(chunk, n)
        root = self.work / f"gpu-{chunk}"
        row = BenchRow("gpu", chunk)
        try:
            with TieredStore(StoreConfig(root=root, dram_bytes=room, gpu_bytes=room, nvme_bytes=0,
                                         pin_dram=True)) as store:
                def put_all():
                    for i, k in enumerate(keys):
                        store.put(k, src[i])

                def get_all():
                    for b in range(0, n, 64):
                        ks = keys[b : b + 64]
                        if not all(store.get_many_into(ks, [dst[b + j] for j in range(len(ks))])):
                            raise BenchError("GPU-tier read missed")

                for _ in range(cfg.repeat):
                    row.writes.append(_gbps(nbytes, _event_seconds(put_all)))
                    get_all()  # the puts landed in DRAM: this promotes them into the GPU tier
                    row.reads.append(_gbps(nbytes, _event_seconds(get_all)))
                resident = sum(x == "gpu" for x in store.locate(keys))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        row.note = (f"put(cuda tensor) copies to pinned DRAM; get_many_into CUDA buffers from the GPU tier "
                    f"({resident}/{n} resident): device-to-device, so no host yardstick")
        self.report.rows.append(row)

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
        contiguous = align_up(chunk) == chunk  # chunks lie back to back in staging and in dst

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
                    if contiguous:
                        dst.narrow(0, b * chunk, len(ks) * chunk).copy_(
                            staging[s].narrow(0, 0, len(ks) * chunk), non_blocking=True)
                    else:
                        for j in range(len(ks)):
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

        for tier, fn, note in (
            ("nvme->gpu", pipeline, "NVMe -> pinned staging (2 slots) -> GPU on a side stream, overlapped"),
            ("nvme->gpu:direct", direct, "get_many_into CUDA buffers (the store's own bounce through pinned memory)"),
        ):
            row = BenchRow(tier, chunk, note=note)
            for _ in range(cfg.repeat):
                store.drop_cached()
                torch.cuda.synchronize()
                row.reads.append(_gbps(nbytes, _event_seconds(fn, stream)))
            if not torch.equal(dst.narrow(0, 0, chunk).cpu(), store.get(keys[0]).view(-1)):
                raise BenchError("NVMe -> GPU returned different bytes than were put")
            self._h2d_ref(row)
            self.report.rows.append(row)

    def cleanup(self) -> None:
        self.close_dram()
        shutil.rmtree(self.work, ignore_errors=True)


def plan(cfg: BenchConfig) -> list[tuple[str, Callable[[_Runner], None]]]:
    """The benchmark's steps, in order (so a progress bar knows how many there are)."""
    want_gpu = cuda_available() and "gpu" in cfg.tiers
    steps: list[tuple[str, Callable[[_Runner], None]]] = []
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
    """Run every step of `plan(cfg)`; `progress(done, total, label)` before each. Cleans up what it wrote."""
    created = not cfg.root.exists()
    cfg.root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    report = BenchReport(cfg, describe_host(cfg.root))
    runner = _Runner(cfg, report)
    steps = plan(cfg)
    start = time.perf_counter()
    try:
        runner.work.mkdir()
        for i, (label, step) in enumerate(steps):
            if progress is not None:
                progress(i, len(steps), label)
            step(runner)
        if progress is not None:
            progress(len(steps), len(steps), "done")
    finally:
        runner.cleanup()
        torch.set_num_threads(threads)
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


# ---------------------------------------------------------------------------- rendering
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

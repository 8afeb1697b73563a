"""The steps of `hstore bench`: each tier through the store's public API, next to its yardstick.

Every figure is a median over repetitions of moving `total` bytes in chunks of
one size, and each comes with the yardstick it should be judged against:

* DRAM tier: `put` then `get_into` of every chunk (a store with DRAM only, its
  arena warmed by one untimed pass); put+get = bytes / (put time + get time).
* NVMe tier: write = `put` of every chunk then `flush()` (two-stage saving to
  the end: the data is durable); read = `drop_cached()`, then `get_many_into`
  aligned (pinned where CUDA is) buffers in batches, promote=False: the
  restore path, every chunk read from the device and checksum-verified.
  "I/O GB/s" is the payload over the time the I/O engine itself was busy
  during those reads (the store is given a timing engine): read/I/O is the
  share the tier's CPU work (header, key and checksum checks, Python) leaves
  to the device. Yardstick: plain synchronous O_DIRECT reads of 8 MiB from a
  file of `total` bytes in the same directory (`raw_sequential_read_gbps`). In
  every repetition the file is rewritten after the store's flush and read
  right after the store's read, so both reads find their data equally fresh.
* With CUDA: pinned host-to-device copies (the yardstick), the GPU tier (put
  of CUDA tensors, get_many_into CUDA buffers from GPU-resident items), and
  NVMe -> pinned DRAM -> GPU (reads into two pinned staging buffers, each
  copied to the GPU on a side stream while the next batch is read; and the
  store's own path, get_many_into CUDA buffers), timed with CUDA events.

Everything is written under a private directory in ROOT, removed at the end.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import torch

from hstore import StoreConfig, TieredStore
from hstore.buffers import align_up, aligned_empty, cuda_available
from hstore.errors import HStoreError
from hstore.format import default_nvme_dir
from hstore.io import make_engine
from hstore.io.engine import IoEngine, IoOp
from hstore.record import HEADER_BYTES
from hstore.testing import data_file_fd
from hstore.units import MiB, format_size
from hstore_bench.host import describe_host
from hstore_bench.rawio import raw_sequential_read_gbps, write_raw_file
from hstore_bench.results import TARGET_CHUNK, BenchConfig, BenchReport, BenchRow, evaluate_targets

GB = 1e9
_POOL_BYTES = 64 * MiB  # source/destination rings: larger than any last-level cache


class BenchError(HStoreError):
    """The benchmark could not measure what it was asked to (a read failed, a chunk came back wrong)."""


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


class TimedEngine(IoEngine):
    """An engine that adds up the time spent in read batches (the device's share of a read); given to
    the store as its `io_engine`, so the bench needs nothing but the store's public configuration."""

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


def opened_direct(nvme_dir: Path) -> bool | None:
    """Whether this process has the data file in `nvme_dir` open with O_DIRECT (from /proc/self/fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{data_file_fd(nvme_dir)}") as f:
            flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
    except (OSError, StopIteration, ValueError):
        return None
    return bool(flags & os.O_DIRECT)


def _keys(chunk: int, n: int) -> list[str]:
    return [f"bench/{chunk}/{i}" for i in range(n)]


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else float("inf")


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
            self.raw.writes.append(write_raw_file(self.raw_path, self.cfg.total, self.cfg.raw_block))
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
            io_engine=TimedEngine(make_engine(cfg.engine, queue_depth=cfg.queue_depth)), queue_depth=cfg.queue_depth,
        )
        timed = store_cfg.io_engine
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
                self.report.direct_io = opened_direct(default_nvme_dir(store_cfg.root))
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
            timed.close()
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

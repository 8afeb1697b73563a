"""Raw sequential I/O bandwidth: the yardstick for the NVMe tier's numbers.

`raw_sequential_read_gbps` is what the device gives a plain program: one
synchronous O_DIRECT preadv of `block_bytes` after another, like
`dd if=FILE of=/dev/null iflag=direct bs=8M`. It uses no io_uring on purpose,
so it stays a reference the engines (and the tier above them) are compared to.
`engine_sequential_read_gbps` reads the same file through an `IoEngine` in one
batch of `op_bytes` ops, so the two numbers can be put side by side:

    python -m hstore_bench.rawio FILE [--op-kib 512] [--depth 32] [--engine uring]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from hstore.buffers import ALIGN, align_up, aligned_empty
from hstore.errors import StoreConfigError, StoreIOError
from hstore.io.engine import IoEngine, IoOp

GB = 1e9


def _check_block(nbytes: int, what: str) -> None:
    if nbytes <= 0 or nbytes % ALIGN:
        raise StoreConfigError(f"{what} must be a positive multiple of {ALIGN}, got {nbytes}")


def _span(fd: int, total_bytes: int | None) -> int:
    size = os.fstat(fd).st_size
    return size if total_bytes is None else min(size, total_bytes)


def raw_sequential_read_gbps(path: str, block_bytes: int = 8 << 20, total_bytes: int | None = None) -> float:
    """GB/s (1e9 bytes/s) of synchronous O_DIRECT reads of `block_bytes` from the
    start of `path` until `total_bytes` (default: the whole file) are read."""
    _check_block(block_bytes, "block_bytes")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        span = _span(fd, total_bytes)
        view = memoryview(aligned_empty(block_bytes, pin=False).numpy())
        done = 0
        start = time.perf_counter()
        while done < span:
            want = min(block_bytes, align_up(span - done))
            n = os.preadv(fd, [view[:want]], done)
            if n == 0:
                break
            done += n
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return min(done, span) / elapsed / GB if elapsed > 0 else 0.0


def engine_sequential_read_gbps(
    engine: IoEngine,
    path: str,
    op_bytes: int = 512 << 10,
    total_bytes: int | None = None,
    buffer_bytes: int = 64 << 20,
) -> float:
    """GB/s of reading `path` through `engine` as one batch of `op_bytes` ops
    (the engine decides how many are in flight). The ops cycle through one
    `buffer_bytes` buffer: the data is thrown away, only the bandwidth counts."""
    _check_block(op_bytes, "op_bytes")
    buffer_bytes = max(align_up(buffer_bytes, op_bytes), op_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        span = _span(fd, total_bytes)
        buf = aligned_empty(buffer_bytes, pin=False)  # keep alive until the batch is done
        base = buf.data_ptr()
        ops = [
            IoOp(False, fd, off, ((base + off % buffer_bytes, min(op_bytes, align_up(span - off))),))
            for off in range(0, span, op_bytes)
        ]
        start = time.perf_counter()
        results = engine.run(ops)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    bad = [r for r in results if r < 0]
    if bad:
        raise StoreIOError(f"{len(bad)} reads failed, first: {os.strerror(-bad[0])}", -bad[0])
    return min(sum(results), span) / elapsed / GB if elapsed > 0 else 0.0


def write_raw_file(path: Path, total: int, block: int) -> float:
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
        return done / (time.perf_counter() - start) / GB
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    from hstore.io import make_engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--block-mib", type=int, default=8, help="raw read block size")
    ap.add_argument("--op-kib", type=int, default=512, help="engine op size")
    ap.add_argument("--depth", type=int, default=32, help="io_uring queue depth")
    ap.add_argument("--workers", type=int, default=8, help="thread-pool workers")
    ap.add_argument("--engine", default="auto", choices=["auto", "uring", "threads"])
    args = ap.parse_args(argv)
    raw = raw_sequential_read_gbps(args.path, args.block_mib << 20)
    with make_engine(args.engine, queue_depth=args.depth, workers=args.workers) as engine:
        eng = engine_sequential_read_gbps(engine, args.path, args.op_kib << 10)
        name = engine.name
    print(f"raw O_DIRECT preadv, {args.block_mib} MiB blocks: {raw:.3f} GB/s")
    print(f"{name}, {args.op_kib} KiB ops: {eng:.3f} GB/s ({eng / raw:.1%} of raw)")


if __name__ == "__main__":
    main()

"""The I/O engines against real O_DIRECT files: io_uring and the thread pool
must give the same answers op for op, and FaultyEngine must inject exactly the
faults its rules describe. No engine is mocked; contents are always compared.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import resource
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hstore.io as hio
from hstore.buffers import ALIGN, aligned_empty
from hstore.errors import StoreClosedError, StoreConfigError
from hstore.io import FaultyEngine, IoEngine, IoOp, ThreadPoolEngine, make_engine
from hstore_bench.rawio import engine_sequential_read_gbps, raw_sequential_read_gbps
from hstore.io.threadpool import advance_views, iov_views

DEPTH = 8  # small, so batches of dozens of ops must refill the ring
URING_SKIP = pytest.mark.skipif(
    not hio.uring_available(), reason=f"io_uring unavailable: {hio.uring_unavailable_reason()}"
)
KINDS = ["threads", pytest.param("uring", marks=URING_SKIP)]


@pytest.fixture(params=KINDS)
def engine(request) -> IoEngine:
    with make_engine(request.param, queue_depth=DEPTH, workers=4) as e:
        yield e


@pytest.fixture
def dfile(tmp_path):
    """An fd opened O_DIRECT on a file in a directory that supports it."""
    base = os.environ.get("HSTORE_TEST_DIR") or str(tmp_path)
    path = os.path.join(base, f"engine-{os.getpid()}-{random.getrandbits(32):08x}.bin")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        pytest.skip(f"{base} does not support O_DIRECT ({e}); set HSTORE_TEST_DIR")
    yield fd
    os.close(fd)
    os.unlink(path)


def buf(nbytes: int, fill: int | None = None, seed: int | None = None) -> torch.Tensor:
    """A 4096-aligned uint8 buffer: constant `fill`, or random bytes from `seed`."""
    t = aligned_empty(nbytes, pin=False)
    if seed is not None:
        t.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    else:
        t.fill_(0 if fill is None else fill)
    return t


def closed_fd() -> int:
    """An fd number that is closed and stays so: the highest allowed one
    (new fds, such as a ring's, take the lowest free number)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fd = (65536 if soft == resource.RLIM_INFINITY else min(soft, 65536)) - 1
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, fd)
    os.close(fd)
    os.close(null)
    return fd


def op(write: bool, fd: int, offset: int, t: torch.Tensor, start: int = 0, length: int | None = None,
       parts: int = 1) -> IoOp:
    """An op over t[start:start+length], split into `parts` aligned iovecs."""
    length = t.numel() - start if length is None else length
    blocks = length // ALIGN
    cuts = [0] + [blocks * i // parts * ALIGN for i in range(1, parts)] + [length]
    base = t.data_ptr() + start
    iov = tuple((base + a, b - a) for a, b in zip(cuts, cuts[1:]) if b > a)
    return IoOp(write, fd, offset, iov)


# --- round trips -----------------------------------------------------------


def test_batch_with_more_ops_than_queue_depth_round_trips(engine, dfile):
    n, size = 10 * DEPTH, 4 * ALIGN
    slots = list(range(n))
    random.Random(1).shuffle(slots)  # file offsets out of order
    src = buf(n * size, seed=1)
    writes = [op(True, dfile, slot * size, src, i * size, size) for i, slot in enumerate(slots)]
    assert engine.run(writes) == [size] * n

    dst = buf(n * size, fill=0)
    reads = [op(False, dfile, slot * size, dst, i * size, size) for i, slot in enumerate(slots)]
    assert engine.run(reads[::-1]) == [size] * n
    assert torch.equal(dst, src)


def test_vectored_ops_scatter_and_gather(engine, dfile):
    """Write from iovecs scattered over a buffer in reverse order; read back
    with a different split; the file holds the gather order."""
    src = buf(12 * ALIGN, seed=2)
    pieces = [(0, 1), (1, 3), (4, 2), (6, 6)]  # (first block, blocks)
    iov = tuple((src.data_ptr() + b * ALIGN, n * ALIGN) for b, n in reversed(pieces))
    assert engine.run([IoOp(True, dfile, 0, iov)]) == [12 * ALIGN]

    dst = buf(12 * ALIGN, fill=0)
    assert engine.run([op(False, dfile, 0, dst, parts=5)]) == [12 * ALIGN]
    expected = torch.cat([src[b * ALIGN:(b + n) * ALIGN] for b, n in reversed(pieces)])
    assert torch.equal(dst, expected)


def test_read_past_eof_is_short_and_leaves_the_rest_untouched(engine, dfile):
    src = buf(3 * ALIGN, seed=3)
    assert engine.run([op(True, dfile, 0, src)]) == [3 * ALIGN]

    dst = buf(8 * ALIGN, fill=0xAB)
    across, at_eof, beyond = engine.run([
        op(False, dfile, ALIGN, dst, parts=3),
        op(False, dfile, 3 * ALIGN, buf(ALIGN)),
        op(False, dfile, 100 * ALIGN, buf(ALIGN)),
    ])
    assert (across, at_eof, beyond) == (2 * ALIGN, 0, 0)
    assert torch.equal(dst[: 2 * ALIGN], src[ALIGN:])
    # Past the count the kernel may zero-fill (iomap does) but delivers no data.
    tail = dst[2 * ALIGN:]
    assert bool(((tail == 0xAB) | (tail == 0)).all())


def test_bad_fds_give_ebadf(engine, dfile, tmp_path):
    closed = closed_fd()
    (tmp_path / "ro").write_bytes(b"")
    readonly = os.open(tmp_path / "ro", os.O_RDONLY)
    try:
        b = buf(ALIGN)
        results = engine.run([
            op(False, closed, 0, b),
            op(False, -1, 0, b),
            op(True, readonly, 0, b),
            op(True, dfile, 0, b),
        ])
    finally:
        os.close(readonly)
    assert results == [-errno.EBADF, -errno.EBADF, -errno.EBADF, ALIGN]


def test_unaligned_direct_ops_give_einval_without_hurting_neighbours(engine, dfile):
    b = buf(4 * ALIGN, seed=4)
    good = op(True, dfile, 0, b, 0, ALIGN)
    assert engine.run([op(True, dfile, 0, b)]) == [4 * ALIGN]  # a read at EOF would be 0, unchecked
    results = engine.run([
        IoOp(False, dfile, 0, ((b.data_ptr() + 1, ALIGN),)),  # unaligned address
        IoOp(False, dfile, 1, ((b.data_ptr(), ALIGN),)),  # unaligned offset
        IoOp(True, dfile, 0, ((b.data_ptr(), 100),)),  # unaligned length
        good,
    ])
    assert results == [-errno.EINVAL] * 3 + [ALIGN]


def test_empty_batch_and_empty_op(engine, dfile):
    assert engine.run([]) == []
    assert engine.run([IoOp(False, dfile, 0, ())]) == [0]


def test_concurrent_batches_from_several_threads(engine, dfile):
    threads, rounds, ops_per, size = 4, 10, 12, 2 * ALIGN
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            region = w * rounds * ops_per * size
            for r in range(rounds):
                base = region + r * ops_per * size
                src = buf(ops_per * size, seed=1000 * w + r)
                dst = buf(ops_per * size, fill=0)
                writes = [op(True, dfile, base + i * size, src, i * size, size) for i in range(ops_per)]
                reads = [op(False, dfile, base + i * size, dst, i * size, size, parts=2) for i in range(ops_per)]
                assert engine.run(writes) == [size] * ops_per
                assert engine.run(reads) == [size] * ops_per
                assert torch.equal(src, dst)
        except BaseException as e:  # re-raised on the main thread
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors


def test_fsync_succeeds_on_a_good_fd_and_reports_a_bad_one(engine, dfile):
    assert engine.fsync(dfile) == 0
    assert engine.fsync(closed_fd()) == -errno.EBADF


def test_closed_engine_refuses_work_and_close_is_idempotent(dfile):
    for kind in ["threads"] + (["uring"] if hio.uring_available() else []):
        e = make_engine(kind, queue_depth=DEPTH, workers=2)
        assert e.run([op(True, dfile, 0, buf(ALIGN))]) == [ALIGN]
        e.close()
        e.close()
        with pytest.raises(StoreClosedError):
            e.run([op(False, dfile, 0, buf(ALIGN)), op(False, dfile, 0, buf(ALIGN))])


@given(
    segments=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(1, 3)),  # gap, blocks, iovecs
        min_size=1,
        max_size=24,
    ),
    order=st.randoms(use_true_random=False),
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_aligned_batches_round_trip(engine, dfile, segments, order):
    layout, offset = [], 0  # (file offset, bytes, iovecs), non-overlapping
    for gap, blocks, parts in segments:
        offset += gap * ALIGN
        layout.append((offset, blocks * ALIGN, parts))
        offset += blocks * ALIGN
    total = sum(n for _, n, _ in layout)
    src = buf(total, seed=order.getrandbits(31))
    dst = buf(total, fill=0)
    writes, reads, pos = [], [], 0
    for off, n, parts in layout:
        writes.append(op(True, dfile, off, src, pos, n, parts))
        reads.append(op(False, dfile, off, dst, pos, n, 4 - parts))
        pos += n
    order.shuffle(writes)
    order.shuffle(reads)
    assert engine.run(writes) == [w.expected for w in writes]
    assert engine.run(reads) == [r.expected for r in reads]
    assert torch.equal(src, dst)


# --- short transfers ------------------------------------------------------------


@URING_SKIP
def test_uring_resubmits_short_transfers_across_iovecs():
    """A pipe hands out what it has, so each readv is short; the ring must
    advance through the iovecs until the writer closes (then report the count)."""
    rfd, wfd = os.pipe()
    chunks = [bytes([i + 1]) * 1000 for i in range(8)]

    def writer() -> None:
        for c in chunks:
            os.write(wfd, c)
            threading.Event().wait(0.005)
        os.close(wfd)

    dst = buf(16 * 1024, fill=0)
    base = dst.data_ptr()
    t = threading.Thread(target=writer)
    t.start()
    try:
        with make_engine("uring", queue_depth=2) as e:
            (got,) = e.run([IoOp(False, rfd, 0, ((base, 3000), (base + 3000, 5000), (base + 8000, 8000)))])
    finally:
        t.join()
        os.close(rfd)
    assert got == 8000
    assert bytes(dst[:8000].numpy()) == b"".join(chunks)
    assert int(dst[8000:].sum()) == 0


@given(lengths=st.lists(st.integers(0, 50), max_size=6), n=st.integers(0, 300))
def test_advance_views_drops_exactly_n_bytes(lengths, n):
    data = aligned_empty(max(sum(lengths), 1), pin=False)
    data.copy_(torch.arange(data.numel()) % 251)
    iov, addr = [], data.data_ptr()
    for length in lengths:
        iov.append((addr, length))
        addr += length
    n = min(n, sum(lengths))
    rest = advance_views(iov_views(tuple(iov)), n)
    assert b"".join(bytes(v) for v in rest) == bytes(data[n:sum(lengths)].numpy())


# --- fault injection -------------------------------------------------------------


@pytest.fixture
def faulty(engine) -> FaultyEngine:
    return FaultyEngine(engine)


def fill_file(engine: IoEngine, fd: int, blocks: int, seed: int) -> torch.Tensor:
    src = buf(blocks * ALIGN, seed=seed)
    assert engine.run([op(True, fd, 0, src)]) == [blocks * ALIGN]
    return src


def test_eio_on_an_offset_range(faulty, dfile):
    src = fill_file(faulty, dfile, 8, seed=5)
    faulty.fail(errno.EIO, write=False, offsets=(2 * ALIGN, 4 * ALIGN))
    dst = buf(8 * ALIGN, fill=0x5A)
    results = faulty.run([op(False, dfile, i * ALIGN, dst, i * ALIGN, ALIGN) for i in range(8)])
    assert results == [ALIGN, ALIGN, -errno.EIO, -errno.EIO] + [ALIGN] * 4
    assert bool((dst[2 * ALIGN:4 * ALIGN] == 0x5A).all())  # a failed read delivers nothing
    assert torch.equal(dst[:2 * ALIGN], src[:2 * ALIGN])
    assert torch.equal(dst[4 * ALIGN:], src[4 * ALIGN:])
    assert faulty.rules[0].fired == 2


def test_enospc_on_the_nth_write_writes_nothing(faulty, dfile):
    old = fill_file(faulty, dfile, 4, seed=6)
    rule = faulty.fail(errno.ENOSPC, write=True, nth=2)
    new = buf(4 * ALIGN, seed=7)
    results = faulty.run([op(True, dfile, i * ALIGN, new, i * ALIGN, ALIGN) for i in range(4)])
    assert results == [ALIGN, ALIGN, -errno.ENOSPC, ALIGN]
    assert (rule.matched, rule.fired) == (4, 1)

    dst = buf(4 * ALIGN)
    assert faulty.run([op(False, dfile, 0, dst)]) == [4 * ALIGN]
    assert torch.equal(dst[2 * ALIGN:3 * ALIGN], old[2 * ALIGN:3 * ALIGN])  # the failed write never landed
    assert torch.equal(dst[:2 * ALIGN], new[:2 * ALIGN])
    assert torch.equal(dst[3 * ALIGN:], new[3 * ALIGN:])


def test_short_read_returns_fewer_bytes_once(faulty, dfile):
    src = fill_file(faulty, dfile, 4, seed=8)
    faulty.short(keep=ALIGN, write=False, times=1)
    dst = buf(4 * ALIGN, fill=0)
    assert faulty.run([op(False, dfile, 0, dst, parts=2)]) == [ALIGN]
    assert torch.equal(dst[:ALIGN], src[:ALIGN])
    assert int(dst[ALIGN:].sum()) == 0
    assert faulty.run([op(False, dfile, 0, dst, parts=2)]) == [4 * ALIGN]  # times=1: spent
    assert torch.equal(dst, src)


def test_bit_flip_on_read_is_silent_but_visible_in_content(faulty, dfile):
    src = fill_file(faulty, dfile, 2, seed=9)
    faulty.flip(at=ALIGN + 17, mask=0x10, write=False, times=1)
    dst = buf(2 * ALIGN, fill=0)
    assert faulty.run([op(False, dfile, 0, dst, parts=2)]) == [2 * ALIGN]  # reported as a success
    diff = (dst != src).nonzero().flatten().tolist()
    assert diff == [ALIGN + 17]
    assert int(dst[ALIGN + 17]) == int(src[ALIGN + 17]) ^ 0x10


def test_bit_flip_on_write_corrupts_the_device_not_the_caller(faulty, dfile):
    src = buf(2 * ALIGN, seed=10)
    keep = src.clone()
    faulty.flip(at=5, mask=0x80, write=True)
    assert faulty.run([op(True, dfile, 0, src)]) == [2 * ALIGN]
    assert torch.equal(src, keep)
    faulty.clear()
    dst = buf(2 * ALIGN)
    assert faulty.run([op(False, dfile, 0, dst)]) == [2 * ALIGN]
    assert (dst != src).nonzero().flatten().tolist() == [5]


def test_fsync_failure_then_recovery(faulty, dfile):
    rule = faulty.fail_fsync(errno.EIO, times=1)
    assert faulty.fsync(dfile) == -errno.EIO
    assert faulty.fsync(dfile) == 0
    assert rule.fired == 1


def test_first_matching_rule_wins_and_each_counts_its_own_matches(faulty, dfile):
    fill_file(faulty, dfile, 4, seed=11)
    eio = faulty.fail(errno.EIO, write=False, nth=1)
    enospc = faulty.fail(errno.ENOSPC, write=False)  # always eligible, but second in line
    results = faulty.run([op(False, dfile, 0, buf(ALIGN)) for _ in range(3)])
    assert results == [-errno.ENOSPC, -errno.EIO, -errno.ENOSPC]
    assert (eio.matched, eio.fired, enospc.matched, enospc.fired) == (3, 1, 3, 2)


# --- choosing an engine, and the bandwidth yardstick ----------------------------------------


def test_make_engine_kinds():
    with make_engine("threads", workers=2) as e:
        assert isinstance(e, ThreadPoolEngine)
    with pytest.raises(StoreConfigError):
        make_engine("spdk")
    if hio.uring_available():
        with make_engine("auto") as e:
            assert e.name == "uring"


def test_auto_falls_back_once_and_uring_explains_why(monkeypatch, caplog):
    monkeypatch.setattr(hio, "unavailable_reason", lambda: "blocked by test")
    monkeypatch.setattr(hio, "_fallback_logged", False)
    with caplog.at_level(logging.WARNING, logger="hstore.io"):
        for _ in range(2):
            with make_engine("auto", workers=2) as e:
                assert isinstance(e, ThreadPoolEngine)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "blocked by test" in caplog.records[0].getMessage()
    with pytest.raises(StoreConfigError, match="blocked by test"):
        make_engine("uring")


def test_bandwidth_helpers_read_the_whole_file(engine, dfile):
    fill_file(engine, dfile, 64, seed=12)
    path = f"/proc/self/fd/{dfile}"
    assert raw_sequential_read_gbps(path, block_bytes=16 * ALIGN) > 0
    assert engine_sequential_read_gbps(engine, path, op_bytes=4 * ALIGN, buffer_bytes=16 * ALIGN) > 0

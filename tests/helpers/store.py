"""Helpers shared by the TieredStore tests and the crash-test child process.

Plain functions (importable from a subprocess too): byte-exact tensor
comparison, tensors whose content is derivable from their key and a version
(so a process that did not put them can check them), and `scan_root`, an
offline `hstore verify`: it reads the LMDB index and the data files directly,
without the store's read path, and reports every entry that does not point at
a record exactly as the index describes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import xxhash

import hstore.io as hio
from hstore.policy import AdmissionPolicy
from hstore.buffers import align_up
from hstore.index import Index
from hstore.format import LAYOUT_META_KEY, data_file, index_path
from hstore.record import DTYPE_TO_CODE, HEADER_BYTES, RecordHeader

URING_SKIP = pytest.mark.skipif(
    not hio.uring_available(), reason=f"io_uring unavailable: {hio.uring_unavailable_reason()}"
)
ENGINE_KINDS = ["threads", pytest.param("uring", marks=URING_SKIP)]
"""Parameters for tests that run on each I/O engine."""

STORE_DEFAULTS = dict(dram_bytes=1 << 20, nvme_bytes=8 << 20, gpu_bytes=0, gpu_device="cpu",
                      io_engine="threads", io_threads=2, queue_depth=16, put_timeout_s=10.0)
"""A small store: tests override what they exercise."""

ALL_DTYPES = sorted(DTYPE_TO_CODE, key=str)
KEYED_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8,
                torch.uint8, torch.complex64]
_VERSION_BYTES = 8


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, in row-major order (bitwise: NaNs and invalid bools compare exactly)."""
    if t.numel() == 0:
        return b""
    # A fresh copy: .contiguous() may keep an odd stride on a size-1 dim, which view() rejects.
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.detach().cpu().reshape(-1))
    return flat.view(torch.uint8).numpy().tobytes()


def assert_same(got: torch.Tensor | None, want: torch.Tensor) -> None:
    """`got` is exactly `want`: dtype, shape and every byte."""
    assert got is not None, "expected a tensor, got a miss"
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    assert tensor_bytes(got) == tensor_bytes(want)


def random_tensor(gen: torch.Generator, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random content of any storable dtype (random bit patterns; bools are 0/1)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def rand(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """random_tensor with a seed: the same call gives the same tensor."""
    return random_tensor(torch.Generator().manual_seed(seed), dtype, tuple(shape))


def cold(store) -> None:
    """Make every following read of a store come from NVMe."""
    store.flush()
    store.drop_cached()


def _seed(key: bytes, version: int) -> int:
    return int.from_bytes(hashlib.blake2b(key + version.to_bytes(8, "little"), digest_size=8).digest(), "little") >> 1


KEYED_MAX_BYTES = 24 << 10


def keyed_tensor(key: str | bytes, version: int = 0) -> torch.Tensor:
    """A tensor (at most KEYED_MAX_BYTES) that is a pure function of (key, version), with the
    version readable from its first 8 bytes."""
    kb = key.encode() if isinstance(key, str) else bytes(key)
    gen = torch.Generator().manual_seed(_seed(kb, version))
    dtype = KEYED_DTYPES[int(torch.randint(0, len(KEYED_DTYPES), (1,), generator=gen))]
    nbytes = 8 * int(torch.randint(1, KEYED_MAX_BYTES // 8 + 1, (1,), generator=gen))
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    raw[:_VERSION_BYTES] = torch.frombuffer(bytearray(version.to_bytes(_VERSION_BYTES, "little")), dtype=torch.uint8)
    flat = raw.view(dtype)
    if flat.numel() % 2 == 0 and int(torch.randint(0, 2, (1,), generator=gen)):
        return flat.reshape(2, -1)
    return flat


def version_of(t: torch.Tensor) -> int:
    return int.from_bytes(tensor_bytes(t)[:_VERSION_BYTES], "little")


def check_keyed(key: str | bytes, t: torch.Tensor | None) -> int:
    """Assert `t` is some version of `key`'s keyed tensor; return that version."""
    assert t is not None, f"{key!r}: miss"
    v = version_of(t)
    assert_same(t, keyed_tensor(key, v))
    return v


@dataclass
class ScanReport:
    entries: int = 0
    keys: set[bytes] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def scan_root(root: str | os.PathLike) -> ScanReport:
    """Check every index entry of a closed store against the bytes in its data file."""
    report = ScanReport()
    idx = Index(index_path(root), readonly=True)
    try:
        meta = idx.meta_get(LAYOUT_META_KEY)
        entries = list(idx.items())
        report.entries = len(entries)
        if not entries:
            return report
        dirs = json.loads(meta)["nvme_dirs"]
        files = [open(data_file(d), "rb") for d in dirs]
        try:
            extents: list[tuple[int, int, int, bytes]] = []
            for e in entries:
                report.keys.add(e.key)
                name = f"{e.key[:40]!r} @ dev {e.device} off {e.offset}"
                if not 0 <= e.device < len(files) or e.offset % 4096 or e.length != HEADER_BYTES + align_up(e.nbytes):
                    report.problems.append(f"{name}: bad location {e}")
                    continue
                extents.append((e.device, e.offset, e.offset + e.length, e.key))
                f = files[e.device]
                f.seek(e.offset)
                block = f.read(e.length)
                if len(block) != e.length:
                    report.problems.append(f"{name}: record runs past the end of the file")
                    continue
                hdr = RecordHeader.unpack(block[:HEADER_BYTES])
                payload = block[HEADER_BYTES : HEADER_BYTES + e.nbytes]
                if hdr is None:
                    report.problems.append(f"{name}: no valid record header")
                elif not hdr.describes(e.key, e.dtype, e.shape, e.nbytes, e.checksum):
                    report.problems.append(f"{name}: header {hdr} does not match the index {e}")
                elif xxhash.xxh3_64_intdigest(payload) != e.checksum:
                    report.problems.append(f"{name}: payload checksum mismatch")
            extents.sort()
            for (d1, _, end1, k1), (d2, start2, _, k2) in zip(extents, extents[1:]):
                if d1 == d2 and start2 < end1:
                    report.problems.append(f"records of {k1[:40]!r} and {k2[:40]!r} overlap on device {d1}")
        finally:
            for f in files:
                f.close()
    finally:
        idx.close()
    return report


def find_record(path: str | os.PathLike, key: str | bytes) -> int | None:
    """Offset of the (first) record header of `key` in a data file, found by scanning headers."""
    key = key.encode() if isinstance(key, str) else bytes(key)
    with open(path, "rb") as f:
        offset = 0
        while block := f.read(HEADER_BYTES):
            hdr = RecordHeader.unpack(block)
            if hdr is not None and hdr.names(key):
                return offset
            offset += HEADER_BYTES
    return None


def scan_root_elsewhere(root: str | os.PathLike) -> ScanReport:
    """`scan_root` from another process: LMDB refuses a second open in this one, so this is
    how to scan a store that is still open here (what a crash right now would leave)."""
    code = (
        "import json, sys\nfrom tests.helpers.store import scan_root\n"
        "r = scan_root(sys.argv[1])\n"
        "print(json.dumps({'entries': r.entries, 'keys': [k.hex() for k in r.keys], 'problems': r.problems}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    if proc.returncode:
        raise AssertionError(f"scan failed: {proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return ScanReport(out["entries"], {bytes.fromhex(k) for k in out["keys"]}, out["problems"])


def memory_ladder(dram: int = 256 << 10, gpu: int = 0):
    """(catalog, ladder) over real memory tiers (a GPU tier on CPU memory when `gpu`), wired as the store wires them."""
    from hstore.catalog import Catalog
    from hstore.ladder import TierLadder
    from hstore.policy import LruPolicy
    from hstore.stats import StoreStats
    from hstore.tiers.memory import DramTier, GpuTier

    tiers = ([GpuTier(gpu, "cpu")] if gpu else []) + [DramTier(dram)]
    stats = StoreStats()
    ladder = TierLadder(tiers, stats)
    cat = Catalog([LruPolicy() for _ in tiers], landing=ladder.landing.index, durable=None, free=ladder.free,
                  view=ladder.view, index=None, stats=stats)
    ladder.attach(cat)
    return cat, ladder


def put_in_landing(cat, ladder, key: bytes, value: torch.Tensor):
    """Install `value` under `key` with one copy in the landing tier (what a put does, minus the checks)."""
    import time

    tier = ladder.landing.tier
    loc = tier.allocate(value.numel() * value.element_size())
    tier.view(loc).copy_(value.reshape(-1).view(torch.uint8))
    with cat.lock:
        e = cat.new_entry_locked(key, value.dtype, tuple(value.shape), loc.nbytes, None, time.time())
        cat.install_locked(e, 0, False)
        cat.add_copy_locked(e, ladder.landing.index, loc)
    return e


class SwitchAdmission(AdmissionPolicy):
    """An NVMe admission policy that admits while `open` is true: lets a test decline chosen puts."""

    name = "switch"

    def __init__(self) -> None:
        self.open = True

    def admit(self, key: bytes, size: int, cost: float | None = None) -> bool:
        return self.open

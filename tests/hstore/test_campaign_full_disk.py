"""A full disk, for real: a small ext4 filesystem loop-mounted for the test (skipped, with the reason,
where the machine does not allow it). Opening with more NVMe space than there is fails at once and
leaves nothing behind; a disk that fills while the store runs makes flush() raise a clear StoreIOError,
the values stay readable from DRAM, nothing flushed before is lost, and once space is freed the
store carries on and everything reopens exactly as put."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from hstore import StoreConfig, StoreIOError, TieredStore
from tests.helpers.store import STORE_DEFAULTS, assert_same, keyed_tensor, scan_root, tensor_bytes

MiB = 1 << 20


@contextmanager
def small_ext4(tmp_path: Path, size: int):
    """A fresh ext4 filesystem of `size` bytes mounted under tmp_path (pytest.skip where it cannot be)."""
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted filesystem needs root")
    if shutil.which("mkfs.ext4") is None or not Path("/dev/loop-control").exists():
        pytest.skip("no mkfs.ext4 or no loop devices on this machine")
    image, mnt = tmp_path / "disk.img", tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill_up(path: Path) -> int:
    """Write a file until the filesystem is full; its size."""
    chunk = b"\xaa" * MiB
    written = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n = f.write(chunk if written % MiB == 0 else chunk[: 4096])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) > 4096:
                    chunk = chunk[:4096]
                    continue
                break
            written += n
    return written


@pytest.mark.campaign
def test_more_nvme_space_than_the_disk_has_fails_at_open_and_leaves_nothing(tmp_path, campaign_figures):
    with small_ext4(tmp_path, 24 * MiB) as mnt:
        cfg = StoreConfig(**dict(STORE_DEFAULTS, root=mnt / "store", nvme_bytes=64 * MiB))
        with pytest.raises(StoreIOError, match="cannot reserve") as exc:
            TieredStore(cfg)
        assert exc.value.errno == errno.ENOSPC
        assert shutil.disk_usage(mnt).free > 20 * MiB  # the failed reservation was given back
        with TieredStore(StoreConfig(**dict(STORE_DEFAULTS, root=mnt / "store", nvme_bytes=8 * MiB))) as store:
            store.put("k", torch.ones(4))
            store.flush()
    campaign_figures.update(full_disk_opens=1)


@pytest.mark.campaign
@pytest.mark.parametrize("engine", ["threads", "auto"])
def test_a_disk_that_fills_while_the_store_runs(tmp_path, campaign_figures, engine):
    figures = campaign_figures
    figures.update(failed_flushes=0, keys_checked=0, lost=0, wrong=0)
    with small_ext4(tmp_path, 32 * MiB) as mnt:
        cfg = StoreConfig(**dict(STORE_DEFAULTS, root=mnt / "store", nvme_bytes=16 * MiB, dram_bytes=4 * MiB,
                                 io_engine=engine, put_timeout_s=5.0))
        flushed = {f"early{i}": keyed_tensor(f"early{i}", i) for i in range(20)}
        later = {f"late{i}": keyed_tensor(f"late{i}", i) for i in range(200)}
        store = TieredStore(cfg)
        try:
            for k, v in flushed.items():
                store.put(k, v)
            store.flush()
            fill_up(mnt / "filler")  # the disk is full now: the index cannot grow
            for k, v in later.items():
                store.put(k, v)
            with pytest.raises(StoreIOError) as exc:
                store.flush()
            figures["failed_flushes"] += 1
            assert "index" in str(exc.value) or exc.value.errno == errno.ENOSPC
            for k, v in {**flushed, **later}.items():  # everything still served, exactly
                got = store.get(k)
                figures["keys_checked"] += 1
                if got is None:
                    figures["lost"] += 1
                elif got.dtype != v.dtype or tensor_bytes(got) != tensor_bytes(v):
                    figures["wrong"] += 1
            (mnt / "filler").unlink()
            for _ in range(20):  # a batch that failed before the space came back may be reported once more
                try:
                    store.flush()
                    break
                except StoreIOError:
                    figures["failed_flushes"] += 1
            assert store.stats()["dirty_items"] == 0
        finally:
            store.close()
        assert scan_root(cfg.root).problems == []
        with TieredStore(cfg) as again:
            for k, v in {**flushed, **later}.items():
                got = again.get(k)
                figures["keys_checked"] += 1
                if got is None:
                    figures["lost"] += 1
                else:
                    assert_same(got, v)
    assert figures["lost"] == 0 and figures["wrong"] == 0

"""What survives: striping over every NVMe directory, flush() then reopen, a refused reopen with
another layout, the root's lock, interpreter exit with a store left open, closing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hstore import StoreClosedError, StoreConfigError, StoreLockedError, TieredStore
from hstore.record import MAGIC
from hstore.format import DATA_FILE
from tests.helpers.store import (
    cold,
    rand,
    ENGINE_KINDS,
    assert_same,
    keyed_tensor,
    scan_root,
    scan_root_elsewhere,
)

KiB = 1 << 10
MiB = 1 << 20


# ---------------------------------------------------------------------------- NVMe striping, durability, reopen
def test_items_are_striped_over_every_nvme_dir(open_store, store_config, tmp_path, engine_kind):
    dirs = [tmp_path / f"ssd{i}" for i in range(3)]
    store = open_store(nvme_dirs=dirs, nvme_bytes=6 * MiB, io_engine=engine_kind)
    values = {f"k{i}": rand((5 * KiB,), torch.float16, i) for i in range(12)}
    for k, v in values.items():
        store.put(k, v)
    cold(store)
    for k, v in values.items():
        assert_same(store.get(k), v)
    store.close()
    per_dir = []
    for d in dirs:
        data = (d / DATA_FILE).read_bytes()
        assert len(data) == 2 * MiB
        per_dir.append(sum(data[o : o + len(MAGIC)] == MAGIC for o in range(0, len(data), 4096)))
    assert sum(per_dir) == 12 and min(per_dir) >= 3, per_dir
    report = scan_root(store_config().root)
    assert report.entries == 12 and report.problems == []
    with TieredStore(store_config(nvme_dirs=dirs, nvme_bytes=6 * MiB, io_engine=engine_kind)) as again:
        for k, v in values.items():
            assert_same(again.get(k), v)


def test_flush_makes_everything_durable_across_reopen(store_config, engine_kind):
    cfg = store_config(dram_bytes=512 * KiB, nvme_bytes=8 * MiB, io_engine=engine_kind)
    values = {f"k{i}": keyed_tensor(f"k{i}", i) for i in range(80)}
    with TieredStore(cfg) as store:
        for k, v in values.items():
            store.put(k, v)
        store.flush()
        st = store.stats()
        assert st["dirty_items"] == 0 and st["flush_failures"] == 0
        assert st["bytes_flushed"] == st["bytes_put"] == sum(v.numel() * v.element_size() for v in values.values())
        # What a crash right now would leave: the index already lists every item, intact.
        report = scan_root_elsewhere(cfg.root)
        assert report.entries == len(values) and report.problems == []
    with TieredStore(cfg) as again:
        assert len(again) == len(values)
        assert set(again.locate(list(values))) == {"nvme"}
        for k, v in values.items():
            assert_same(again.get(k), v)
        assert again.stats()["corrupt_chunks"] == 0


def test_reopen_with_other_nvme_dirs_or_smaller_nvme_is_refused(store_config, tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    with TieredStore(store_config(nvme_dirs=dirs, nvme_bytes=4 * MiB)) as store:
        store.put("k", torch.ones(4))
    with pytest.raises(StoreConfigError, match="keeps its NVMe data"):
        TieredStore(store_config(nvme_dirs=[tmp_path / "a", tmp_path / "c"], nvme_bytes=4 * MiB))
    with pytest.raises(StoreConfigError, match="keeps its NVMe data"):
        TieredStore(store_config(nvme_dirs=list(reversed(dirs)), nvme_bytes=4 * MiB))
    with pytest.raises(StoreConfigError, match="cannot shrink"):
        TieredStore(store_config(nvme_dirs=dirs, nvme_bytes=2 * MiB))
    with pytest.raises(StoreConfigError, match="nvme_bytes > 0"):
        TieredStore(store_config(nvme_bytes=0))
    # every refusal released the lock and changed nothing
    with TieredStore(store_config(nvme_dirs=dirs, nvme_bytes=8 * MiB)) as store:  # growing is fine
        assert_same(store.get("k"), torch.ones(4))
    assert scan_root(store_config().root).problems == []


def test_second_open_of_a_root_is_refused_until_closed(open_store, store_config, tmp_path):
    store = open_store()
    store.put("k", torch.ones(2))
    with pytest.raises(StoreLockedError, match=str(os.getpid())):
        TieredStore(store_config())
    code = (
        "import sys\nfrom hstore import TieredStore, StoreConfig, StoreLockedError\n"
        f"try:\n    TieredStore(StoreConfig(root={str(store_config().root)!r}, dram_bytes=1<<20, nvme_bytes=8<<20))\n"
        "except StoreLockedError as e:\n    print('locked', e)\n    sys.exit(0)\nsys.exit(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same(store.get("k"), torch.ones(2))  # the refused opens did not disturb the open store
    store.close()
    with TieredStore(store_config()) as again:
        assert_same(again.get("k"), torch.ones(2))


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_store_left_open_is_flushed_at_interpreter_exit(store_config, engine):
    cfg = store_config(io_engine=engine)
    code = (
        "import sys, torch\nfrom hstore import TieredStore, StoreConfig\n"
        f"s = TieredStore(StoreConfig(root={str(cfg.root)!r}, dram_bytes=1 << 20, nvme_bytes=8 << 20, "
        f"io_engine={engine!r}))\n"
        "for i in range(50):\n    s.put(f'k{i}', torch.full((300,), float(i)))\n"
        "print('exiting', flush=True)\n"  # no close(): the interpreter exits with the flusher busy
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with TieredStore(cfg) as store:
        assert len(store) == 50
        for i in range(50):
            assert_same(store.get(f"k{i}"), torch.full((300,), float(i)))


def test_closed_store_raises_store_closed_error(open_store):
    store = open_store()
    store.put("k", torch.ones(2))
    store.close()
    store.close()  # idempotent
    assert store.closed
    calls = [
        lambda: store.put("k", torch.ones(2)),
        lambda: store.get("k"),
        lambda: store.get_many(["k"]),
        lambda: store.get_into("k", torch.empty(2)),
        lambda: store.get_many_into(["k"], [torch.empty(2)]),
        lambda: store.delete("k"),
        lambda: store.flush(),
        lambda: store.locate(["k"]),
        lambda: "k" in store,
        lambda: len(store),
        lambda: store.keys(),
        lambda: store.drop_cached(),
    ]
    for call in calls:
        with pytest.raises(StoreClosedError):
            call()


def test_context_manager_closes(store_config):
    with TieredStore(store_config()) as store:
        store.put("k", torch.ones(1))
    assert store.closed
    with pytest.raises(StoreClosedError):
        store.get("k")

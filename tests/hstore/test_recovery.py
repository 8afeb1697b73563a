"""A lost or damaged index is rebuilt from the data files' record headers: `hstore recover ROOT`
and StoreConfig(recover_index=True); and a store written in format 1 (before keys were kept in
record headers) opens and reads, while its records are counted as not recoverable."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from hstore import StoreConfig, TieredStore
from hstore.cli import main
from hstore.errors import IndexCorruptError
from hstore.format import LAYOUT_META_KEY, index_data_file, index_path, layout_path
from hstore.index import Index
from hstore.record import MAX_INLINE_KEY
from tests.helpers.store import STORE_DEFAULTS, assert_same, keyed_tensor, scan_root

DATA = Path(__file__).parent / "data"
LONG_KEY = "L" * (MAX_INLINE_KEY + 1)  # only a digest fits the header: not recoverable


def fill(cfg: StoreConfig) -> dict[str, torch.Tensor]:
    """A store with overwrites, a delete and a key too long to recover; returns what it holds."""
    want = {f"k{i}": keyed_tensor(f"k{i}", i) for i in range(40)}
    with TieredStore(cfg) as store:
        for k, v in want.items():
            store.put(k, v)
        store.flush()
        for i in range(0, 40, 5):  # newer versions: their older records stay on disk, superseded
            want[f"k{i}"] = keyed_tensor(f"k{i}", 100 + i)
            store.put(f"k{i}", want[f"k{i}"])
        store.put(LONG_KEY, torch.ones(10))
        store.put("gone", torch.zeros(10))
        store.flush()
        store.delete("gone")
    return want


def check(store: TieredStore, want: dict[str, torch.Tensor]) -> None:
    for k, v in want.items():
        assert_same(store.get(k), v)
    assert store.get(LONG_KEY) is None
    got = store.get("gone")  # a deleted key whose space was not reused may come back, exactly as put
    assert got is None or torch.equal(got, torch.zeros(10))


def test_recover_command_after_the_index_is_deleted(store_config, capsys):
    cfg = store_config()
    want = fill(cfg)
    shutil.rmtree(index_path(cfg.root))
    with pytest.raises(IndexCorruptError, match=f"hstore recover {cfg.root}"):
        TieredStore(cfg)  # data files without an index: not silently opened empty
    assert main(["recover", str(cfg.root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the 8 overwritten keys' older records are superseded where their space was not reused since
    # (best fit may hand it to a later put): at most 8, and the newest version is what `check` sees
    assert report["recovered"] >= len(want) and report["digest_only"] == 1 and report["superseded"] <= 8
    assert scan_root(cfg.root).problems == []
    with TieredStore(cfg) as store:
        check(store, want)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_open_with_recover_index_after_the_index_is_damaged(store_config, damage):
    cfg = store_config()
    want = fill(cfg)
    f = index_data_file(cfg.root)
    data = f.read_bytes()
    f.write_bytes(bytes(len(data)) if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(IndexCorruptError):
        TieredStore(cfg)
    with TieredStore(store_config(recover_index=True)) as store:
        assert store.recovery is not None and store.recovery.recovered >= len(want)
        assert Path(store.recovery.moved_aside).is_dir()  # the damaged index is kept, not deleted
        check(store, want)
    with TieredStore(cfg) as store:  # rebuilt for good: opens without the option now
        assert store.recovery is None
        check(store, want)


def test_recover_with_the_layout_file_lost_too_takes_the_dirs_from_the_command(store_config, tmp_path, capsys):
    dirs = [tmp_path / "ssd0", tmp_path / "ssd1"]
    cfg = store_config(nvme_dirs=dirs)
    want = fill(cfg)
    shutil.rmtree(index_path(cfg.root))
    layout_path(cfg.root).unlink()
    assert main(["recover", str(cfg.root)]) == 2  # ROOT/nvme holds nothing: told to name the directories
    assert "--nvme-dir" in capsys.readouterr().err
    assert main(["recover", str(cfg.root), "--nvme-dir", str(dirs[0]), "--nvme-dir", str(dirs[1])]) == 0
    assert "recovered" in capsys.readouterr().out
    with TieredStore(cfg) as store:
        check(store, want)


def test_recover_of_a_healthy_store_keeps_every_key(store_config, capsys):
    cfg = store_config()
    want = fill(cfg)
    assert main(["recover", str(cfg.root)]) == 0
    with TieredStore(cfg) as store:
        check(store, want)


def test_recover_refuses_a_store_in_use(open_store, store_config, capsys):
    open_store()
    assert main(["recover", str(store_config().root)]) == 1
    assert "open in another process" in capsys.readouterr().err


# ---------------------------------------------------------------------------- format 1
FORMAT1 = {
    "float": torch.arange(1000, dtype=torch.float32),
    "int16-2d": torch.arange(6000, dtype=torch.int16).reshape(2, 3000),
    "scalar": torch.tensor(7, dtype=torch.int64),
    "empty": torch.empty(0, 3, dtype=torch.bfloat16),
    "k" * 600: torch.ones(5, dtype=torch.uint8),
    "overwritten": torch.full((3,), 2.0),
}


def format1_store(tmp_path: Path) -> StoreConfig:
    """The store tests/hstore/data/store_format1.tar.gz holds, written by the code before format 2
    (FORMAT1's values, and "deleted" put, flushed and deleted), moved to tmp_path."""
    with tarfile.open(DATA / "store_format1.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "v1store"
    idx = Index(index_path(root))
    try:  # the index names its NVMe directory by absolute path: point it at the moved one
        idx.meta_put(LAYOUT_META_KEY, json.dumps({"format": 1, "nvme_dirs": [str((root / "nvme").resolve())]}).encode())
    finally:
        idx.close()
    return StoreConfig(**dict(STORE_DEFAULTS, root=root, nvme_bytes=1 << 20))


def test_a_format_1_store_opens_reads_and_takes_new_writes(tmp_path):
    cfg = format1_store(tmp_path)
    with TieredStore(cfg) as store:
        assert sorted(store.keys()) == sorted(k.encode() for k in FORMAT1)
        for k, v in FORMAT1.items():
            assert_same(store.get(k), v)
        store.put("new", torch.ones(3))
        store.put("float", torch.zeros(2))
    assert scan_root(cfg.root).problems == []
    with TieredStore(cfg) as store:
        assert_same(store.get("new"), torch.ones(3))
        assert_same(store.get("float"), torch.zeros(2))
        assert_same(store.get("int16-2d"), FORMAT1["int16-2d"])


def test_format_1_records_are_counted_not_recovered(tmp_path, capsys):
    cfg = format1_store(tmp_path)
    with TieredStore(cfg) as store:
        store.put("written-in-format-2", torch.ones(3))
    shutil.rmtree(index_path(cfg.root))
    assert main(["recover", str(cfg.root), "--nvme-dir", str(cfg.root / "nvme"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recovered"] == 1 and report["digest_only"] >= len(FORMAT1)
    with TieredStore(cfg) as store:
        assert store.keys() == [b"written-in-format-2"]

"""StoreConfig validation: every bad value fails when the config is built (or, for what
only opening can tell, when the store opens) with a StoreConfigError that names it,
and a refused open leaves the root unlocked and unclaimed."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import hstore
from hstore import HStoreError, StoreConfig, StoreConfigError, TieredStore
from hstore.io import FaultyEngine, ThreadPoolEngine

KiB = 1 << 10
MiB = 1 << 20


def test_defaults_are_valid_and_documented_shape(tmp_path):
    cfg = StoreConfig(root=str(tmp_path))
    assert isinstance(cfg.root, Path)
    assert cfg.nvme_paths == [tmp_path / "nvme"]
    assert StoreConfig(root=tmp_path, nvme_bytes=0).nvme_paths == []
    assert StoreConfig(root=tmp_path, nvme_dirs=[tmp_path / "a", str(tmp_path / "b")]).nvme_paths == [
        tmp_path / "a", tmp_path / "b"]
    assert issubclass(StoreConfigError, ValueError) and issubclass(StoreConfigError, HStoreError)
    assert hstore.StoreConfig is StoreConfig and hstore.TieredStore is TieredStore
    with pytest.raises(AttributeError):
        hstore.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("name", ["dram_bytes", "nvme_bytes", "gpu_bytes", "flush_batch_bytes", "index_map_bytes"])
@pytest.mark.parametrize("value", [-1, 1.5, "1024", True, None])
def test_capacities_must_be_non_negative_ints(tmp_path, name, value):
    with pytest.raises(StoreConfigError, match=name):
        StoreConfig(root=tmp_path, **{name: value})


@pytest.mark.parametrize("overrides, match", [
    (dict(dram_bytes=0), "dram_bytes"),
    (dict(dram_bytes=64 * KiB - 1), "dram_bytes"),
    (dict(flush_batch_bytes=4095), "flush_batch_bytes"),
    (dict(io_engine="io_uring"), "io_engine"),
    (dict(io_engine=ThreadPoolEngine), "io_engine"),  # the class, not an engine
    (dict(io_engine=None), "io_engine"),
    (dict(queue_depth=0), "queue_depth"),
    (dict(queue_depth=4097), "queue_depth"),
    (dict(queue_depth=2.0), "queue_depth"),
    (dict(io_threads=0), "io_threads"),
    (dict(nvme_dirs="/a/single/path"), "nvme_dirs"),
    (dict(nvme_dirs=[]), "nvme_dirs"),
    (dict(put_timeout_s=0), "put_timeout_s"),
    (dict(put_timeout_s=-1.0), "put_timeout_s"),
    (dict(put_timeout_s=math.nan), "put_timeout_s"),
    (dict(put_timeout_s="10"), "put_timeout_s"),
])
def test_bad_values_are_refused_when_built(tmp_path, overrides, match):
    with pytest.raises(StoreConfigError, match=match):
        StoreConfig(root=tmp_path, **overrides)


def test_duplicate_nvme_dirs_are_refused_however_spelled(tmp_path):
    with pytest.raises(StoreConfigError, match="duplicates"):
        StoreConfig(root=tmp_path, nvme_dirs=[tmp_path / "a", tmp_path / "b" / ".." / "a"])


def test_a_ready_made_engine_is_accepted_and_left_open(tmp_path):
    engine = FaultyEngine(ThreadPoolEngine(2))
    cfg = StoreConfig(root=tmp_path, dram_bytes=1 * MiB, nvme_bytes=4 * MiB, io_engine=engine)
    with TieredStore(cfg) as store:
        assert store.stats()["io_engine"] == "faulty(threads)"
        store.put("k", torch.ones(10))
        store.flush()
    # the caller owns it: still usable for the next open
    with TieredStore(cfg) as store:
        store.drop_cached()
        assert torch.equal(store.get("k"), torch.ones(10))
    engine.close()


@pytest.mark.parametrize("overrides, match", [
    (dict(eviction="nope"), "eviction"),
    (dict(eviction=42), "eviction"),
    (dict(admission="nope"), "admission"),
    (dict(placement="nope"), "placement"),
    (dict(gpu_bytes=1 * MiB, gpu_device="nonsense"), "gpu"),
    (dict(gpu_bytes=1 * MiB, gpu_device="meta"), "gpu"),
    pytest.param(dict(gpu_bytes=1 * MiB, gpu_device="cuda"), "gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    (dict(nvme_bytes=4 * KiB), "too small"),
    (dict(nvme_bytes=12 * KiB, nvme_dirs=["d1", "d2"]), "too small"),
    (dict(dram_bytes=1 << 52), "dram"),
])
def test_what_only_opening_can_tell_is_refused_at_open(tmp_path, overrides, match):
    root = tmp_path / "store"
    if "nvme_dirs" in overrides:
        overrides["nvme_dirs"] = [tmp_path / d for d in overrides["nvme_dirs"]]
    with pytest.raises(StoreConfigError, match=match):
        TieredStore(StoreConfig(**{"root": root, "dram_bytes": 1 * MiB, "nvme_bytes": 4 * MiB, **overrides}))
    # the refused open left the root unlocked and unclaimed
    with TieredStore(StoreConfig(root=root, dram_bytes=1 * MiB, nvme_bytes=4 * MiB)) as store:
        store.put("k", torch.ones(1))
        store.flush()


def test_root_that_is_a_file_is_refused(tmp_path):
    root = tmp_path / "file"
    root.write_text("x")
    with pytest.raises(StoreConfigError, match="root"):
        TieredStore(StoreConfig(root=root, dram_bytes=1 * MiB, nvme_bytes=0))


def test_keyword_overrides_build_the_config(tmp_path):
    with TieredStore(root=tmp_path, dram_bytes=1 * MiB, nvme_bytes=0) as store:
        assert store.config.dram_bytes == 1 * MiB
        store.put("k", torch.ones(1))
    with pytest.raises(StoreConfigError):
        TieredStore(root=tmp_path, dram_bytes=1)
    with pytest.raises(TypeError):
        TieredStore(root=tmp_path, no_such_option=1)

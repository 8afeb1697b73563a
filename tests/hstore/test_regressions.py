"""One regression test per defect the outside fault campaign found (issue 14), through the public API.

Each failed on the code before its fix: an overwrite that kept the old NVMe record as its own, a
put that raised after it had installed the new value, a flush() that returned while an item over
half the NVMe tier was silently kept in DRAM, put_many of tiny items waiting out its timeout, a
CUDA read without CUDA raising torch's AssertionError, and a damaged index raising lmdb's errors.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from hstore import HStoreError, TieredStore
from hstore.errors import DeviceError, IndexCorruptError, InvalidItemError
from hstore.format import index_data_file
from tests.helpers.store import SwitchAdmission, assert_same, scan_root, scan_root_elsewhere

KiB = 1 << 10
MiB = 1 << 20


# ---------------------------------------------------------------------------- 1. overwrite kept the old record
@pytest.mark.parametrize("new", [
    torch.arange(1000, dtype=torch.int32),  # same byte size, other dtype: passed every record check
    torch.arange(3000, dtype=torch.int16).reshape(2, 1500),  # other size: a ValueError from the tier
], ids=["same-bytes", "other-bytes"])
def test_overwrite_that_nvme_declines_never_serves_the_old_record(store_config, new):
    admission = SwitchAdmission()
    cfg = store_config(admission=admission)
    old = torch.ones(1000, dtype=torch.float32)
    store = TieredStore(cfg)
    try:
        store.put("k", old)
        store.flush()
        admission.open = False
        store.put("k", new)  # declined by NVMe: memory only
        assert b"k" not in scan_root_elsewhere(cfg.root).keys  # the old record left the index at once
        result = store.flush()
        assert b"k" in result.memory_only
        assert store.stats()["memory_only_items"] == 1
        store.drop_cached()  # must not drop the only copy of the new value
        assert_same(store.get("k"), new)
        assert store.locate(["k"]) == ["dram"]
    finally:
        store.close()
    assert scan_root(cfg.root).problems == []
    with TieredStore(cfg) as again:  # memory-only values are gone after a restart, never replaced by the old bytes
        assert "k" not in again and again.get("k") is None


def test_overwrite_that_is_flushed_replaces_the_old_record(store_config):
    cfg = store_config()
    with TieredStore(cfg) as store:
        store.put("k", torch.ones(1000))
        store.flush()
        store.put("k", torch.arange(1000, dtype=torch.int32))
        store.flush()
        store.drop_cached()
        assert_same(store.get("k"), torch.arange(1000, dtype=torch.int32))
        assert store.stats()["tiers"]["nvme"]["used"] == 4096 + 4096  # one record, the old one freed
    with TieredStore(cfg) as again:
        assert_same(again.get("k"), torch.arange(1000, dtype=torch.int32))


# ---------------------------------------------------------------------------- 2. a put that raised still landed
def test_put_with_a_cost_the_policy_rejects_changes_nothing(store_config):
    cfg = store_config(eviction="cost")
    old = torch.ones(1000)
    with TieredStore(cfg) as store:
        store.put("k", old, cost=2.0)
        store.flush()
        before = store.stats()
        for bad in (-1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="cost"):
                store.put("k", torch.arange(500, dtype=torch.int64), cost=bad)
            with pytest.raises(InvalidItemError):
                store.put_many([("other", torch.ones(2)), ("k", torch.zeros(3))], cost=bad)
        assert_same(store.get("k"), old)
        assert "other" not in store
        after = store.stats()
        assert after["puts"] == before["puts"] and after["dirty_items"] == 0
        store.drop_cached()
        assert_same(store.get("k"), old)
    with TieredStore(cfg) as again:
        assert_same(again.get("k"), old)


def test_cost_is_checked_by_every_policy_but_only_refused_where_it_matters(open_store):
    store = open_store(eviction="lru")  # LRU ignores costs: a negative one is accepted as before
    store.put("k", torch.ones(4), cost=-1.0)
    assert_same(store.get("k"), torch.ones(4))


# ---------------------------------------------------------------------------- 3. flush() returned while not durable
def test_item_over_half_the_nvme_tier_is_made_durable_by_flush(store_config):
    cfg = store_config(dram_bytes=2 * MiB, nvme_bytes=1 * MiB)
    big = torch.randint(0, 255, (700 * KiB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with TieredStore(cfg) as store:
        store.put("small", torch.ones(10))
        store.flush()
        store.put("big", big)
        result = store.flush()
        assert result.memory_only == ()
        store.drop_cached()
        assert store.locate(["big"]) == ["nvme"]
        assert_same(store.get("big"), big)
    with TieredStore(cfg) as again:
        assert_same(again.get("big"), big)


def test_item_larger_than_the_nvme_tier_is_reported_memory_only(store_config):
    cfg = store_config(dram_bytes=4 * MiB, nvme_bytes=1 * MiB)
    huge = torch.ones(300 * KiB)  # 1.2 MB: can never be written to a 1 MiB tier
    with TieredStore(cfg) as store:
        store.put("huge", huge)
        store.put("fine", torch.ones(100))
        result = store.flush()
        assert result.memory_only == (b"huge",)
        st = store.stats()
        assert st["memory_only_items"] == 1 and st["memory_only_puts"] == 1
        assert st["tiers"]["nvme"]["items"] == 1
        store.drop_cached()
        assert_same(store.get("huge"), huge)  # its only copy stays
        store.delete("huge")
        assert store.flush().memory_only == () and store.stats()["memory_only_items"] == 0


# ---------------------------------------------------------------------------- 4. the smaller ones
def test_put_many_of_tiny_items_into_a_small_dram_tier(open_store):
    store = open_store(dram_bytes=256 * KiB, nvme_bytes=8 * MiB, put_timeout_s=5.0)
    items = [(f"t{i}", torch.full((1,), float(i))) for i in range(200)]  # 200 x 4 KiB slots through 64
    store.put_many(items)
    store.flush()
    for k, v in items:
        assert_same(store.get(k), v)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_read_without_cuda_is_an_hstore_error(open_store):
    store = open_store()
    store.put("k", torch.ones(3))
    with pytest.raises(DeviceError, match="cuda"):
        store.get("k", device="cuda")
    with pytest.raises(DeviceError):
        store.get_many(["k", "missing"], device="cuda:1")
    assert_same(store.get("k"), torch.ones(3))  # nothing left pinned or half done


def _damage(path: Path, how: str, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    if how == "zeroed-meta":
        data[: 2 * 4096] = bytes(2 * 4096)
    elif how == "truncated":
        data = data[: len(data) // 3]
    elif how == "garbage":
        data[:] = rng.randbytes(len(data))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["zeroed-meta", "truncated", "garbage"])
def test_damaged_index_is_a_clear_error_naming_the_recover_command(store_config, how):
    cfg = store_config()
    with TieredStore(cfg) as store:
        for i in range(50):
            store.put(f"k{i}", torch.full((100,), float(i)))
    _damage(index_data_file(cfg.root), how, 0)
    with pytest.raises(IndexCorruptError, match=f"hstore recover {cfg.root}") as exc:
        TieredStore(cfg)
    assert isinstance(exc.value, HStoreError)
    # the refused open left nothing locked
    _damage(index_data_file(cfg.root), "zeroed-meta", 0)
    with pytest.raises(IndexCorruptError):
        TieredStore(cfg)


def test_record_whose_dtype_or_shape_differs_from_the_index_is_a_miss(store_config):
    from hstore.index import Index, IndexEntry

    cfg = store_config()
    with TieredStore(cfg) as store:
        store.put("k", torch.ones(1000, dtype=torch.float32))
        store.put("other", torch.zeros(3))
    idx = Index(Path(cfg.root) / "index")
    try:
        e = idx.get(b"k")  # same byte count, other dtype and shape: only the record header can tell
        idx.put_many([IndexEntry(b"k", e.device, e.offset, e.length, e.nbytes, torch.int32, (10, 100),
                                 e.checksum, e.created)])
    finally:
        idx.close()
    with TieredStore(cfg) as store:
        assert store.get("k") is None
        assert store.stats()["corrupt_chunks"] == 1
        assert_same(store.get("other"), torch.zeros(3))


def test_put_many_naming_a_durable_key_twice_with_declined_values(store_config):
    # Found by the model test: the old record was dropped from the index once per mention, and its
    # space freed twice (KeyError from the allocator).
    admission = SwitchAdmission()
    with TieredStore(store_config(admission=admission)) as store:
        store.put("a", torch.ones(3))
        store.flush()
        admission.open = False
        store.put_many([("a", torch.zeros(3)), ("a", torch.full((2,), 5.0))])
        assert_same(store.get("a"), torch.full((2,), 5.0))
        assert store.stats()["tiers"]["nvme"]["used"] == 0

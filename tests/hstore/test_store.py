"""TieredStore against real tiers, real files and both I/O engines: the dict-like API,
eviction and write-back between tiers, admission, striping, durability across
reopen, locking, bad input, concurrency, and a stateful comparison with a dict.

Nothing under test is mocked; every read is compared byte for byte with what
was put (store_helpers.assert_same).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hstore import (
    CapacityError,
    InvalidItemError,
    StoreClosedError,
    StoreConfig,
    StoreConfigError,
    StoreLockedError,
    TieredStore,
)
from hstore.io import uring_available
from hstore.record import MAGIC
from hstore.format import DATA_FILE
from tests.helpers.store import (
    ALL_DTYPES,
    ENGINE_KINDS,
    STORE_DEFAULTS,
    assert_same,
    check_keyed,
    keyed_tensor,
    random_tensor,
    scan_root,
    scan_root_elsewhere,
)

KiB = 1 << 10
MiB = 1 << 20


def rand(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return random_tensor(torch.Generator().manual_seed(seed), dtype, tuple(shape))


def cold(store: TieredStore) -> None:
    """Make every following read come from NVMe."""
    store.flush()
    store.drop_cached()


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_every_dtype_from_dram_nvme_and_after_reopen(open_store, store_config, dtype):
    values = {
        "scalar": rand((), dtype, 1),
        "empty": rand((0, 3), dtype, 2),
        "small": rand((3, 5), dtype, 3),
        "pages": rand((3, 1500), dtype, 4),  # > 4 KiB, not a multiple of it
        "strided": rand((40, 30), dtype, 5)[::3, 1::2],  # non-contiguous view
        "transposed": rand((17, 33), dtype, 6).t(),
    }
    store = open_store()
    for k, v in values.items():
        store.put(k, v)
    for k, v in values.items():
        assert store.locate([k]) == ["dram"]
        assert_same(store.get(k), v.contiguous())
    cold(store)
    assert set(store.locate(list(values))) == {"nvme"}
    for k, v in values.items():
        assert_same(store.get(k), v.contiguous())
    store.close()
    with TieredStore(store_config()) as again:
        got = again.get_many(list(values))
        for (k, v), g in zip(values.items(), got):
            assert_same(g, v.contiguous())


def test_put_copies_the_tensor(open_store):
    store = open_store()
    t = torch.arange(10.0)
    store.put("k", t)
    t.fill_(-1)
    assert_same(store.get("k"), torch.arange(10.0))
    got = store.get("k")
    got.fill_(7)
    assert_same(store.get("k"), torch.arange(10.0))


def test_conj_and_neg_views_are_stored_resolved(open_store):
    store = open_store()
    z = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    store.put("conj", z.conj())
    store.put("neg", torch._neg_view(z))
    assert_same(store.get("conj"), z.conj().resolve_conj())
    assert_same(store.get("neg"), -z)


def test_str_and_bytes_keys_name_the_same_item(open_store, store_config):
    store = open_store()
    store.put("α-key", torch.ones(3))
    assert "α-key".encode() in store
    assert_same(store.get("α-key".encode()), torch.ones(3))
    store.put(bytearray(b"ba"), torch.zeros(2))
    assert_same(store.get("ba"), torch.zeros(2))
    store.put(b"\xff\xfe not utf-8", torch.full((2,), 5))
    store.put(b"", torch.full((1,), 6))
    assert sorted(store.keys()) == sorted([b"", b"ba", b"\xff\xfe not utf-8", "α-key".encode()])
    store.close()
    with TieredStore(store_config()) as again:
        assert_same(again.get(b"\xff\xfe not utf-8"), torch.full((2,), 5))
        assert_same(again.get(""), torch.full((1,), 6))
        assert_same(again.get("α-key"), torch.ones(3))


def test_long_keys_sharing_a_prefix_stay_distinct_across_reopen(open_store, store_config):
    # LMDB keys are limited to 511 bytes: long keys are indexed by digest.
    prefix = b"p" * 600
    keys = [prefix + bytes([i]) for i in range(5)] + [b"q" * 511, b"r" * 512, "s" * 5000]
    store = open_store()
    for i, k in enumerate(keys):
        store.put(k, torch.full((i + 1,), i))
    store.close()
    with TieredStore(store_config()) as again:
        assert sorted(again.keys()) == sorted(k.encode() if isinstance(k, str) else k for k in keys)
        for i, k in enumerate(keys):
            assert_same(again.get(k), torch.full((i + 1,), i))


def test_overwrite_replaces_value_dtype_and_shape_in_every_tier(open_store, store_config):
    store = open_store()
    store.put("k", torch.ones(1000))
    cold(store)
    store.put("k", torch.arange(6, dtype=torch.int16).reshape(2, 3))
    assert_same(store.get("k"), torch.arange(6, dtype=torch.int16).reshape(2, 3))
    cold(store)
    assert store.locate(["k"]) == ["nvme"]
    assert_same(store.get("k"), torch.arange(6, dtype=torch.int16).reshape(2, 3))
    store.put("k", torch.zeros(3, dtype=torch.bool))  # newer than what is on NVMe
    assert len(store) == 1
    store.close()
    with TieredStore(store_config()) as again:
        assert_same(again.get("k"), torch.zeros(3, dtype=torch.bool))
        assert len(again) == 1


def test_delete_from_each_tier_and_after_reopen(open_store, store_config):
    store = open_store()
    for i in range(4):
        store.put(f"k{i}", torch.full((100,), i))
    cold(store)
    store.get("k1")  # promoted back to DRAM
    store.put("k2", torch.full((5,), 22))  # dirty, with an older durable copy
    assert store.delete("k0") and store.delete("k1") and store.delete("k2")
    assert not store.delete("k0")
    assert not store.delete("never")
    for k in ("k0", "k1", "k2"):
        assert k not in store
        assert store.get(k) is None
    assert len(store) == 1 and store.keys() == [b"k3"]
    store.close()
    with TieredStore(store_config()) as again:
        assert again.keys() == [b"k3"]
        assert again.get("k2") is None
        assert_same(again.get("k3"), torch.full((100,), 3))
    assert scan_root(store_config().root).problems == []


def test_contains_len_keys_and_non_key_membership(open_store):
    store = open_store()
    assert len(store) == 0 and store.keys() == [] and "a" not in store
    store.put("a", torch.ones(1))
    store.put(b"b", torch.ones(1))
    assert "a" in store and b"a" in store and "b" in store
    assert 42 not in store and None not in store
    assert len(store) == 2
    store.put("a", torch.zeros(1))
    assert len(store) == 2


def test_get_many_with_misses_duplicates_and_device(open_store):
    store = open_store()
    store.put("a", torch.ones(3))
    store.put("b", torch.arange(4))
    cold(store)
    store.put("c", torch.zeros(2, 2))
    got = store.get_many(["a", "missing", "b", "c", "a", b"missing2"], device="cpu")
    assert got[1] is None and got[5] is None
    assert_same(got[0], torch.ones(3))
    assert_same(got[4], torch.ones(3))
    assert_same(got[2], torch.arange(4))
    assert_same(got[3], torch.zeros(2, 2))
    assert store.get_many([]) == []
    assert store.get("missing") is None


# ---------------------------------------------------------------------------- get_into
def test_get_into_fills_buffers_from_every_tier(open_store):
    store = open_store()
    value = rand((3, 3000), torch.float32, 9)
    store.put("k", value)
    out = torch.empty(3, 3000)
    assert store.get_into("k", out)
    assert_same(out, value)
    cold(store)
    # an unaligned output buffer (offset by one element) forces the bounce path
    backing = torch.empty(9001)
    out = backing[1:].view(3, 3000)
    assert store.get_into("k", out)
    assert_same(out, value)
    flat = torch.empty(9000)  # same dtype and element count, other shape: accepted
    assert store.get_into("k", flat)
    assert_same(flat, value.reshape(-1))
    assert not store.get_into("missing", torch.empty(1))


def test_get_many_into_partial_misses_and_promotion_flag(open_store):
    store = open_store()
    store.put("a", torch.arange(2000.0))
    store.put("b", torch.arange(10, dtype=torch.int8))
    cold(store)
    outs = [torch.empty(2000), torch.empty(1), torch.empty(10, dtype=torch.int8)]
    assert store.get_many_into(["a", "nope", "b"], outs, promote=False) == [True, False, True]
    assert_same(outs[0], torch.arange(2000.0))
    assert_same(outs[2], torch.arange(10, dtype=torch.int8))
    assert store.locate(["a", "b"]) == ["nvme", "nvme"]  # promote=False
    assert store.get_many_into(["a"], [outs[0]], promote=True) == [True]
    assert store.locate(["a"]) == ["dram"]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    chunk_elems=st.sampled_from([1, 7, 1024, 2048, 3000]),  # 4 KiB multiples and odd sizes
    deleted=st.sets(st.integers(0, 11), max_size=4),
    order=st.randoms(use_true_random=False),
    stacked=st.booleans(),
)
def test_get_many_into_one_buffer_with_adjacent_sources_and_holes(n, chunk_elems, deleted, order, stacked):
    """Adjacent chunks read into adjacent views of one buffer are copied as runs; holes, misses and
    any key order still give every view exactly its own value and nothing else."""
    with tempfile.TemporaryDirectory() as root, TieredStore(StoreConfig(root=root, nvme_bytes=0, dram_bytes=1 * MiB)) as store:
        _check_adjacent_reads(store, n, chunk_elems, deleted, order, stacked)


def _check_adjacent_reads(store, n, chunk_elems, deleted, order, stacked):
    values = [torch.full((chunk_elems,), float(i + 1)) for i in range(n)]
    store.put_many([(f"c{i}", v) for i, v in enumerate(values)])
    for i in deleted & set(range(n)):
        store.delete(f"c{i}")
    idx = list(range(n))
    if order.random() < 0.5:
        order.shuffle(idx)
    buf = torch.full((n, chunk_elems), -1.0)
    outs = buf if stacked else list(buf.unbind(0))  # one tensor of rows, or a view per key
    found = store.get_many_into([f"c{i}" for i in idx], outs, promote=False)
    for row, (i, ok) in enumerate(zip(idx, found)):
        assert ok == (i not in deleted)
        if ok:
            assert_same(buf[row], values[i])
        else:
            assert torch.all(buf[row] == -1.0)  # a miss leaves its view untouched


def test_get_many_into_stacked_rows_from_nvme_and_wrong_rows(open_store):
    store = open_store()
    values = [torch.full((3000,), float(i)) for i in range(4)]  # not a multiple of 4 KiB: bounce path on NVMe
    store.put_many([(f"r{i}", v) for i, v in enumerate(values)])
    cold(store)
    rows = torch.empty(4, 3000)
    assert store.get_many_into([f"r{i}" for i in range(4)], rows) == [True] * 4
    assert all(torch.equal(rows[i], values[i]) for i in range(4))
    with pytest.raises(InvalidItemError):
        store.get_many_into(["r0", "r1"], torch.empty(2, 2999))
    with pytest.raises(InvalidItemError):
        store.get_many_into(["r0", "r1"], torch.empty(2, 3000, dtype=torch.float64))
    with pytest.raises(InvalidItemError):
        store.get_many_into(["r0", "r1"], torch.empty(3000, 2).t())  # not contiguous


@pytest.mark.parametrize("bad", [
    torch.empty(3, dtype=torch.float64),  # wrong dtype
    torch.empty(4),  # wrong element count
    torch.empty(6)[::2],  # non-contiguous
    torch.empty(3, device="meta"),  # holds no data
    [0.0, 0.0, 0.0],  # not a tensor
])
def test_get_into_wrong_buffer_raises_and_leaks_nothing(open_store, bad):
    store = open_store(nvme_bytes=0)
    store.put("a", torch.ones(3))
    store.put("b", torch.ones(3))
    with pytest.raises(InvalidItemError):
        store.get_into("a", bad)
    with pytest.raises(InvalidItemError):
        store.get_many_into(["a", "b"], [torch.empty(3), bad])
    with pytest.raises(ValueError):
        store.get_many_into(["a", "b"], [torch.empty(3)])
    # nothing stays pinned by the failed calls: deleting frees every byte
    store.delete("a")
    store.delete("b")
    assert store.stats()["tiers"]["dram"]["used"] == 0


# ---------------------------------------------------------------------------- tiers, eviction, admission
def test_dram_pressure_spills_to_nvme_and_reads_back(open_store, engine_kind):
    store = open_store(dram_bytes=256 * KiB, nvme_bytes=8 * MiB, io_engine=engine_kind)
    values = {f"k{i}": rand((16 * KiB // 4,), torch.float32, i) for i in range(64)}  # 1 MiB through 256 KiB
    for k, v in values.items():
        store.put(k, v)
    where = store.locate(list(values))
    assert "nvme" in where and "dram" in where
    st = store.stats()
    assert st["tiers"]["dram"]["evictions"] > 0 and st["dropped"] == 0
    assert len(store) == 64
    for k in random.Random(0).sample(list(values), len(values)):
        assert_same(store.get(k), values[k])
    st = store.stats()
    assert st["tiers"]["nvme"]["hits"] > 0
    assert st["tiers"]["nvme"]["bytes_read"] > 0
    assert st["tiers"]["dram"]["promotions"] > 0


def test_without_nvme_dram_pressure_drops_items(open_store):
    store = open_store(dram_bytes=128 * KiB, nvme_bytes=0)
    values = {f"k{i}": rand((8 * KiB,), torch.uint8, i) for i in range(64)}
    for k, v in values.items():
        store.put(k, v)
    st = store.stats()
    assert st["dropped"] > 0 and st["tiers"]["dram"]["evictions"] == st["dropped"]
    assert len(store) == 64 - st["dropped"]
    assert "k63" in store  # the newest put is always there
    present = 0
    for k, v in values.items():
        got = store.get(k)
        if got is not None:
            assert_same(got, v)
            present += 1
    assert present == len(store)
    store.flush()  # nothing to flush without NVMe
    assert "nvme" not in store.stats()["tiers"]


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "cost", "gdsf", "LRU"])
def test_each_eviction_policy_keeps_every_item_reachable(open_store, policy):
    store = open_store(dram_bytes=192 * KiB, nvme_bytes=4 * MiB, eviction=policy)
    values = {f"k{i}": rand((6 * KiB,), torch.int16, i) for i in range(48)}
    for i, (k, v) in enumerate(values.items()):
        store.put(k, v, cost=float(i % 5))
        if i % 3 == 0:
            store.get("k0")  # a hot key
    assert store.stats()["tiers"]["dram"]["evictions"] > 0
    for k, v in values.items():
        assert_same(store.get(k), v)


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "cost"])
def test_each_eviction_policy_drops_only_whole_items_without_nvme(open_store, policy):
    store = open_store(dram_bytes=96 * KiB, nvme_bytes=0, eviction=policy)
    values = {f"k{i}": rand((4 * KiB,), torch.int32, i) for i in range(64)}
    for i, (k, v) in enumerate(values.items()):
        store.put(k, v, cost=float(i))
        store.get(f"k{i // 2}")
    survivors = [k for k in values if k in store]
    assert 0 < len(survivors) < 64
    for k in survivors:
        assert_same(store.get(k), values[k])


def test_eviction_policy_factory_is_called_per_tier(open_store):
    from hstore.policy import LruPolicy

    made = []

    def factory():
        made.append(LruPolicy())
        return made[-1]

    store = open_store(eviction=factory, gpu_bytes=64 * KiB)
    store.put("k", torch.ones(2))
    assert len(store.tiers) == 3
    assert len(made) == 3 and len({id(p) for p in made}) == 3  # one policy per tier, none shared


def test_an_eviction_policy_instance_is_refused_with_what_to_pass_instead(store_config):
    from hstore.policy import LruPolicy

    with pytest.raises(StoreConfigError, match="LruPolicy"):
        store_config(eviction=LruPolicy())
    with pytest.raises(StoreConfigError, match="EvictionPolicy"):
        TieredStore(store_config(eviction=lambda: "not a policy"))
    with TieredStore(store_config(eviction=LruPolicy)) as store:  # the class is a factory
        store.put("k", torch.ones(2))


def test_second_hit_admission_keeps_one_hit_wonders_off_nvme(open_store, store_config):
    store = open_store(admission="second-hit")
    store.put("once", torch.ones(100))
    store.put("twice", torch.full((100,), 2.0))
    store.put("twice", torch.full((100,), 3.0))
    store.flush()
    assert store.stats()["tiers"]["nvme"]["items"] == 1
    assert store.drop_cached() == 1  # only the admitted item has a durable copy
    assert store.locate(["once", "twice"]) == ["dram", "nvme"]
    assert_same(store.get("once"), torch.ones(100))
    store.close()
    with TieredStore(store_config(admission="second-hit")) as again:
        assert "once" not in again
        assert_same(again.get("twice"), torch.full((100,), 3.0))


def test_items_larger_than_half_the_nvme_tier_stay_in_dram(open_store):
    store = open_store(dram_bytes=2 * MiB, nvme_bytes=1 * MiB)
    big = rand((700 * KiB,), torch.uint8, 1)
    store.put("big", big)
    store.flush()
    assert store.locate(["big"]) == ["dram"]
    assert_same(store.get("big"), big)


def test_gpu_tier_promotes_on_hit_and_demotes_on_eviction_without_loss(open_store):
    # The GPU tier runs on CPU memory here. NVMe is off, so an item whose only
    # copy is on the GPU would be lost if GPU eviction did not write it back.
    store = open_store(dram_bytes=192 * KiB, gpu_bytes=128 * KiB, nvme_bytes=0, eviction="lru")
    values = {f"k{i}": rand((32 * KiB,), torch.uint8, i) for i in range(8)}
    first, second = list(values)[:4], list(values)[4:]
    for k in first:
        store.put(k, values[k])
    for k in first:
        assert_same(store.get(k), values[k])
    assert store.locate(first) == ["gpu"] * 4
    assert store.stats()["tiers"]["gpu"]["promotions"] == 4
    for k in second:  # DRAM (6 slots) evicts the DRAM copies of k0, k1: they live on the GPU only
        store.put(k, values[k])
    assert store.stats()["dropped"] == 0 and len(store) == 8
    for k in second:  # promoting these evicts `first` from the GPU
        got = store.get(k)
        if got is not None:  # without NVMe, DRAM may drop what has no other copy
            assert_same(got, values[k])
    st = store.stats()
    assert st["tiers"]["gpu"]["evictions"] >= 2
    assert st["tiers"]["gpu"]["demotions"] >= 2
    for k in first:  # written back, not lost
        assert_same(store.get(k), values[k])
    assert st["dropped"] == 8 - len(store)  # every loss is counted


def test_item_larger_than_the_gpu_tier_is_served_without_promotion(open_store):
    store = open_store(gpu_bytes=64 * KiB, dram_bytes=1 * MiB)
    big = rand((80 * KiB,), torch.uint8, 1)
    store.put("big", big)
    assert_same(store.get("big"), big)  # not a CapacityError from the GPU tier
    assert store.locate(["big"]) == ["dram"]
    cold(store)
    assert_same(store.get("big"), big)
    assert store.locate(["big"]) == ["dram"]


def test_gpu_demotion_writes_back_to_dram_and_then_nvme(open_store, store_config):
    # "second-hit": items offered once are not admitted to NVMe, so DRAM (then the GPU) is their only home.
    cfg = store_config(dram_bytes=192 * KiB, gpu_bytes=128 * KiB, nvme_bytes=4 * MiB,
                       admission="second-hit", eviction="lru")
    store = open_store(cfg)
    values = {f"k{i}": rand((32 * KiB,), torch.uint8, i) for i in range(8)}
    for k in list(values)[:4]:
        store.put(k, values[k])
        assert_same(store.get(k), values[k])
    for k in list(values)[4:]:
        store.put(k, values[k])
    assert store.locate(["k0", "k1"]) == ["gpu", "gpu"]
    assert_same(store.get("k4"), values["k4"])  # evicts k0 from the GPU: written back to DRAM
    assert store.stats()["tiers"]["gpu"]["demotions"] == 1
    assert store.locate(["k0"]) == ["dram"]
    store.flush()  # the written-back copy is dirty and goes to NVMe
    assert store.stats()["tiers"]["nvme"]["items"] == 1
    store.close()
    with TieredStore(cfg) as again:
        assert again.keys() == [b"k0"]
        assert_same(again.get("k0"), values["k0"])


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


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", [
    [1, 2, 3], 3.0, None, "tensor", torch.ones(2).numpy(),
    torch.ones(2, 2).to_sparse(),
    torch.empty(2, device="meta"),
    torch.ones(2, dtype=torch.complex32),
    torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
    torch.ones([1] * 33),
])
def test_put_of_a_non_storable_value_raises_invalid_item(open_store, value):
    store = open_store()
    with pytest.raises(InvalidItemError):
        store.put("k", value)
    assert "k" not in store and len(store) == 0
    assert store.stats()["tiers"]["dram"]["used"] == 0


@pytest.mark.parametrize("key", [1, 1.5, None, ("a",), ["a"], object()])
def test_bad_keys_raise_invalid_item(open_store, key):
    store = open_store()
    with pytest.raises(InvalidItemError):
        store.put(key, torch.ones(1))
    with pytest.raises(InvalidItemError):
        store.get(key)
    with pytest.raises(InvalidItemError):
        store.delete(key)
    assert key not in store


def test_get_onto_a_device_that_holds_no_data_raises(open_store):
    store = open_store()
    store.put("k", torch.ones(2))
    with pytest.raises(InvalidItemError):
        store.get("k", device="meta")
    with pytest.raises(RuntimeError):  # torch's own message for a device string it cannot parse
        store.get("k", device="nonsense")
    assert_same(store.get("k"), torch.ones(2))


def test_item_larger_than_dram_raises_capacity_error(open_store):
    store = open_store(dram_bytes=128 * KiB)
    with pytest.raises(CapacityError, match="dram_bytes"):
        store.put("big", torch.empty(129 * KiB, dtype=torch.uint8))
    store.put("fits", torch.ones(128 * KiB, dtype=torch.uint8))  # exactly the capacity
    assert_same(store.get("fits"), torch.ones(128 * KiB, dtype=torch.uint8))


def test_wrong_store_arguments(store_config):
    with pytest.raises(TypeError):
        TieredStore(store_config(), root="x")
    with pytest.raises(StoreConfigError):
        TieredStore(store_config(eviction="nope"))
    with pytest.raises(StoreConfigError):
        TieredStore(store_config(admission="nope"))
    with pytest.raises(StoreConfigError):
        TieredStore(store_config(placement="nope"))
    with TieredStore(store_config()) as store:  # the failed opens left no lock behind
        store.put("k", torch.ones(1))


# ---------------------------------------------------------------------------- stats
def test_stats_counters(open_store):
    store = open_store(dram_bytes=128 * KiB, nvme_bytes=4 * MiB)
    for i in range(3):
        store.put(f"k{i}", torch.ones(1024))  # 4 KiB each
    store.get("k0")
    store.get("nope")
    store.get_many(["k1", "nope2"])
    st = store.stats()
    assert (st["puts"], st["gets"], st["hits"], st["misses"]) == (3, 4, 2, 2)
    assert st["bytes_put"] == 3 * 4096
    assert st["tiers"]["dram"]["hits"] == 2 and st["tiers"]["dram"]["bytes_read"] == 2 * 4096
    assert st["tiers"]["dram"]["items"] == 3 and st["items"] == 3
    assert st["tiers"]["dram"]["capacity"] == 128 * KiB
    cold(store)
    st = store.stats()
    assert st["bytes_flushed"] == 3 * 4096 and st["flushes"] >= 1 and st["dirty_items"] == 0
    assert st["tiers"]["dram"]["used"] == 0 and st["tiers"]["nvme"]["used"] == 3 * 8192
    store.get("k2")
    store.delete("k1")
    st = store.stats()
    assert st["tiers"]["nvme"]["hits"] == 1 and st["tiers"]["nvme"]["bytes_read"] == 4096
    assert st["tiers"]["dram"]["misses"] >= 3 and st["tiers"]["dram"]["promotions"] == 1
    assert st["deletes"] == 1 and st["items"] == 2 and st["tiers"]["nvme"]["items"] == 2
    assert st["corrupt_chunks"] == 0 and st["io_errors"] == 0
    assert st["io_engine"] == "threads"


# ---------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("gpu_bytes", [0, 96 * KiB], ids=["no-gpu", "gpu"])
def test_concurrent_put_get_delete_from_many_threads(open_store, store_config, engine_kind, gpu_bytes):
    store = open_store(dram_bytes=384 * KiB, nvme_bytes=16 * MiB, io_engine=engine_kind, gpu_bytes=gpu_bytes)
    n_threads, steps = 6, 300
    shared = [f"shared{i}" for i in range(12)]
    errors: list[BaseException] = []
    final: dict[str, int | None] = {}
    barrier = threading.Barrier(n_threads)

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        own = [f"t{tid}-{i}" for i in range(10)]
        last: dict[str, int | None] = {}  # this thread's own keys only: nobody else writes them
        try:
            barrier.wait()
            for step in range(steps):
                version = tid * 10_000 + step + 1
                op = rng.random()
                k = rng.choice(own if rng.random() < 0.6 else shared)
                if op < 0.4:
                    store.put(k, keyed_tensor(k, version))
                    if k in own:
                        last[k] = version
                elif op < 0.8:
                    got = store.get(k)
                    if got is not None:
                        v = check_keyed(k, got)
                        if k in last:
                            assert v == last[k], (k, v, last[k])
                    else:
                        assert last.get(k) is None, f"{k} lost"
                elif op < 0.9:
                    keys = rng.sample(own + shared, 5)
                    for kk, got in zip(keys, store.get_many(keys)):
                        if got is not None:
                            check_keyed(kk, got)
                        if kk in last:
                            assert (got is None) == (last[kk] is None), kk
                elif op < 0.97:
                    store.delete(k)
                    if k in own:
                        last[k] = None
                else:
                    store.flush()
            final.update(last)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    store.flush()
    assert store.stats()["corrupt_chunks"] == 0 and store.stats()["dropped"] == 0
    store.close()
    report = scan_root(store_config().root)
    assert report.problems == []
    with TieredStore(store_config(io_engine=engine_kind, nvme_bytes=16 * MiB)) as again:
        for k, v in final.items():
            got = again.get(k)
            if v is None:
                assert got is None
            else:
                assert check_keyed(k, got) == v
        for k in shared:
            if k in again:
                check_keyed(k, again.get(k))


def test_get_racing_an_overwrite_with_another_shape_or_dtype(open_store):
    # get() sizes its output, then reads: an overwrite in between must not yield
    # a tensor that was never put (old shape, new bytes), an exception, or a miss.
    store = open_store(nvme_bytes=0)
    values = [torch.full((2, 3), 1.0), torch.full((3, 2), 2.0), torch.arange(6, dtype=torch.int32),
              torch.full((6,), 3.0)]
    store.put("k", values[0])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.put("k", values[i % len(values)])

    def reader() -> None:
        try:
            for _ in range(3000):
                got = store.get("k")
                assert got is not None, "spurious miss"
                assert any(got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v) for v in values), got
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    if errors:
        raise errors[0]


def test_concurrent_readers_while_flushing_and_evicting(open_store, engine_kind):
    store = open_store(dram_bytes=256 * KiB, nvme_bytes=8 * MiB, io_engine=engine_kind)
    keys = [f"k{i}" for i in range(40)]
    for k in keys[:10]:
        store.put(k, keyed_tensor(k, 1))
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                k = rng.choice(keys[:10])
                assert check_keyed(k, store.get(k)) == 1
                out = keyed_tensor(k, 1).clone()
                out.zero_()
                assert store.get_into(k, out)
                assert check_keyed(k, out) == 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    readers = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in readers:
        t.start()
    try:
        for round_ in range(3):
            for k in keys[10:]:
                store.put(k, keyed_tensor(k, round_))
            store.flush()
            store.drop_cached(keys[:10])
    finally:
        stop.set()
        for t in readers:
            t.join()
    if errors:
        raise errors[0]


def test_close_while_other_threads_read_write_and_delete(store_config, engine_kind):
    # close() must wait for calls in flight: closing files, rings or the index under a
    # read crashed the process or turned a good record into a dropped "unreadable" one.
    cfg = store_config(dram_bytes=256 * KiB, io_engine=engine_kind)
    keys = [f"k{i}" for i in range(40)]
    for trial in range(6):
        store = TieredStore(cfg)
        for k in keys:
            store.put(k, keyed_tensor(k, trial))
        store.flush()
        store.drop_cached()
        errors: list[BaseException] = []
        progress = threading.Semaphore(0)

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while True:
                    ks = rng.sample(keys, 4)
                    for k, got in zip(ks, store.get_many(ks)):
                        assert check_keyed(k, got) == trial
                    store.put(f"extra{seed}", keyed_tensor(f"extra{seed}", trial))
                    store.delete(f"extra{seed}")
                    store.drop_cached()
                    progress.release()
            except StoreClosedError:
                pass
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for _ in range(trial * 3):
            progress.acquire(timeout=30)
        store.close()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        st = store.stats()
        assert st["corrupt_chunks"] == 0 and st["io_errors"] == 0
        assert scan_root(cfg.root).problems == []
        with TieredStore(cfg) as again:
            # an extra key whose put returned but whose delete met the close is legitimately there
            assert {k for k in again.keys() if not k.startswith(b"extra")} == {k.encode() for k in keys}
            for k in again.keys():
                assert check_keyed(k, again.get(k)) == trial


# ---------------------------------------------------------------------------- the store as a dict (hypothesis)
_KEYS = st.sampled_from(
    ["a", "b", "ключ", "", "x" * 511, "y" * 1200]
    + [b"a", b"\x00\xff", b"z" * 700, bytes(range(256)) * 3]
)
_SHAPES = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple),
    st.lists(st.integers(1, 40), min_size=1, max_size=2).map(tuple),
    st.tuples(st.integers(1, 3), st.integers(500, 1500)),
)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(ALL_DTYPES))
    shape = draw(_SHAPES)
    t = random_tensor(torch.Generator().manual_seed(draw(st.integers(0, 2**31))), dtype, shape)
    view = draw(st.sampled_from(["plain", "transpose", "step"]))
    if view == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif view == "step" and t.dim() >= 1 and t.shape[0] >= 2:
        t = t[::2]
    return t


class StoreMachine(RuleBasedStateMachine):
    """The store against a dict: every get answers what the dict holds, across flushes and reopens."""


    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="hstore-sm-"))
        self.store: TieredStore | None = None
        self.model: dict[bytes, torch.Tensor] = {}

    @initialize(engine=st.sampled_from(["threads", "uring"] if uring_available() else ["threads"]),
                eviction=st.sampled_from(["lru", "s3fifo", "cost"]))
    def open(self, engine, eviction):
        # A GPU tier (on CPU memory) smaller than DRAM: promotions, GPU evictions and write-backs happen.
        self.config = StoreConfig(**dict(STORE_DEFAULTS, root=self.root, dram_bytes=128 * KiB, gpu_bytes=64 * KiB,
                                         nvme_bytes=4 * MiB, io_engine=engine, eviction=eviction))
        self.store = TieredStore(self.config)

    @staticmethod
    def norm(k) -> bytes:
        return k.encode() if isinstance(k, str) else k

    @rule(key=_KEYS, value=tensors())
    def put(self, key, value):
        self.store.put(key, value)
        self.model[self.norm(key)] = value.contiguous().clone()

    @rule(items=st.lists(st.tuples(_KEYS, tensors()), max_size=4))
    def put_many(self, items):
        self.store.put_many(items)
        for key, value in items:  # in order: a key given twice keeps its last value
            self.model[self.norm(key)] = value.contiguous().clone()

    @rule(key=_KEYS)
    def get(self, key):
        want = self.model.get(self.norm(key))
        got = self.store.get(key)
        if want is None:
            assert got is None
        else:
            assert_same(got, want)

    @rule(keys=st.lists(_KEYS, max_size=5))
    def get_many(self, keys):
        for k, got in zip(keys, self.store.get_many(keys)):
            want = self.model.get(self.norm(k))
            if want is None:
                assert got is None
            else:
                assert_same(got, want)

    @rule(key=_KEYS)
    def get_into(self, key):
        want = self.model.get(self.norm(key))
        if want is None:
            assert not self.store.get_into(key, torch.empty(1))
            return
        out = torch.empty_like(want)
        assert self.store.get_into(key, out)
        assert_same(out, want)

    @rule(key=_KEYS)
    def delete(self, key):
        assert self.store.delete(key) == (self.model.pop(self.norm(key), None) is not None)

    @rule()
    def flush(self):
        self.store.flush()
        assert self.store.stats()["dirty_items"] == 0

    @rule()
    def drop_cached(self):
        self.store.flush()
        self.store.drop_cached()

    @rule()
    def reopen(self):
        self.store.close()
        report = scan_root(self.root)
        assert report.problems == []
        assert report.keys == set(self.model)
        self.store = TieredStore(self.config)

    @invariant()
    def same_keys(self):
        assert sorted(self.store.keys()) == sorted(self.model)
        assert len(self.store) == len(self.model)

    def teardown(self):
        try:
            if self.store is not None:
                st_ = self.store.stats()
                assert st_["corrupt_chunks"] == 0 and st_["io_errors"] == 0 and st_["dropped"] == 0
        finally:
            if self.store is not None:
                self.store.close()
            shutil.rmtree(self.root, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_store_behaves_like_a_dict = StoreMachine.TestCase

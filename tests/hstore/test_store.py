"""TieredStore's dict-like API against real tiers and files: round trips of every dtype from DRAM,
NVMe and after reopen, keys, overwrite, delete, get_into and get_many_into (lists and stacked rows),
bad input, and the counters.

Nothing under test is mocked; every read is compared byte for byte with what was put.
"""
from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstore import CapacityError, InvalidItemError, StoreConfig, StoreConfigError, TieredStore
from tests.helpers.store import ALL_DTYPES, assert_same, cold, rand, scan_root

KiB = 1 << 10
MiB = 1 << 20


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

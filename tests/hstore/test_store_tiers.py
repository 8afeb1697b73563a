"""The tiers at work: DRAM pressure spilling to NVMe or dropping items, every eviction policy,
admission, promotion into and demotion out of the GPU tier (run on CPU memory here).
"""
from __future__ import annotations

import random

import pytest
import torch

from hstore import StoreConfigError, TieredStore
from tests.helpers.store import assert_same, cold, rand

KiB = 1 << 10
MiB = 1 << 20


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

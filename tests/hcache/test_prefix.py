"""locate_layers on a real store: every stored layer's keys and tiers, and the bytes each tier would
deliver (what the planner weighs), with chunks in DRAM, on NVMe only, and missing."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcache_adapter.layout import StateLayout
from hcache_adapter.manifest import Manifest
from hcache_adapter.prefix import LayerLocations, ManifestCache, complete_chunks, locate_layers, stored_prefix
from hstore import StoreConfig, TieredStore


def test_locate_layers_counts_bytes_per_tier_and_marks_missing_chunks(tmp_path):
    layout = StateLayout("fp", "ns", 64, torch.float16, 32, (4, 4, 4), (8, 8, 8))
    plan, digests = "HKR", [f"d{i}" for i in range(5)]
    h_keys, k_keys = layout.layer_keys(digests, "H", 0), layout.layer_keys(digests, "K", 1)
    assert layout.layer_keys([d.encode() for d in digests], "K", 1) == [k.encode() for k in k_keys]
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=1 << 20, nvme_bytes=8 << 20)) as store:
        store.put_many([(k, torch.zeros(16)) for k in h_keys[:2] + k_keys[:4]])
        store.flush()
        store.drop_cached(h_keys[:2])  # layer 0's first two chunks: on NVMe only
        store.put_many([(k, torch.zeros(16)) for k in h_keys[2:4]])  # in DRAM; chunk 4 of both layers missing
        where, sources = locate_layers(store, layout, plan, digests)
    assert where.keys == {0: [k.encode() for k in h_keys], 1: [k.encode() for k in k_keys]}  # as bytes; layer 2 is
    # recomputed: no keys
    assert where.tiers == {0: ["nvme", "nvme", "dram", "dram", None], 1: ["dram"] * 4 + [None]}
    h_chunk, kv_chunk = 64 * 32 * 2, 64 * 2 * 4 * 8 * 2  # bytes per chunk of a hidden-state and a K/V layer
    assert sources == {"nvme": 2 * h_chunk, "dram": 2 * h_chunk + 4 * kv_chunk, "missing": h_chunk + kv_chunk}
    assert complete_chunks(where) == 4


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["dram", "nvme", "gpu", None]), max_size=12), min_size=1, max_size=5))
def test_complete_chunks_is_the_first_chunk_some_layer_lacks(per_layer):
    """The leading chunks every layer has: the shortest layer's length, cut at the first absent chunk of any."""
    where = LayerLocations({l: [] for l in range(len(per_layer))}, dict(enumerate(per_layer)))
    m = 0
    while all(m < len(t) and t[m] is not None for t in per_layer):
        m += 1
    assert complete_chunks(where) == m


def _nvme_reads(store) -> int:
    return store.stats()["tiers"]["nvme"]["hits"]


def test_a_manifest_cache_reads_manifests_on_nvme_once_and_still_asks_the_index(tmp_path):
    """State evicted to NVMe: the first lookup reads its two end manifests from the disk, later ones none; a
    chunk deleted from the store ends the prefix although its manifest is cached."""
    layout = StateLayout("fp", "ns", 64, torch.float16, 32, (4, 4), (8, 8))
    digests = [f"d{i}" for i in range(6)]
    man = Manifest("fp", "HH", 64, "float16")
    cache = ManifestCache()
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=1 << 20, nvme_bytes=8 << 20)) as store:
        store.put_many([(layout.manifest_key(d), man.encode()) for d in digests])
        store.flush()
        store.drop_cached()
        before = _nvme_reads(store)
        assert stored_prefix(store, layout, digests, cache) == ("HH", 6)
        assert _nvme_reads(store) == before + 2  # the first and the last manifest
        store.drop_cached()
        assert stored_prefix(store, layout, digests, cache) == ("HH", 6)
        assert _nvme_reads(store) == before + 2  # none read again
        store.delete(layout.manifest_key(digests[3]))
        assert stored_prefix(store, layout, digests, cache) == ("HH", 3)  # presence is the index's word
        assert stored_prefix(store, layout, digests) == ("HH", 3)


def test_manifest_cache_keeps_the_most_recent_and_discards_on_request(tmp_path):
    layout = StateLayout("fp", "ns", 64, torch.float16, 32, (4, 4), (8, 8))
    man = Manifest("fp", "HK", 64, "float16")
    keys = [layout.manifest_key(f"d{i}") for i in range(5)]
    cache = ManifestCache(size=3)
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=1 << 20, nvme_bytes=8 << 20)) as store:
        store.put_many([(k, man.encode()) for k in keys])
        assert cache.get_many(store, keys[:2]) == [man, man]
        cache.get_many(store, [keys[0]])  # keys[0] now the most recent
        cache.get_many(store, keys[2:4])  # keys[1], the least recent, goes
        assert len(cache) == 3
        store.delete(keys[1])
        assert cache.get_many(store, [keys[1]]) == [None]  # not cached: read, and absent
        assert cache.get_many(store, [keys[0]]) == [man]
        cache.discard([keys[0], keys[4]])
        assert len(cache) == 2
        assert cache.get_many(store, [keys[4]]) == [man]  # never cached before: read
    with pytest.raises(ValueError):
        ManifestCache(size=-1)

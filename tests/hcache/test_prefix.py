"""locate_layers on a real store: every stored layer's keys and tiers, and the bytes each tier would
deliver (what the planner weighs), with chunks in DRAM, on NVMe only, and missing."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcache_adapter.layout import StateLayout
from hcache_adapter.prefix import LayerLocations, complete_chunks, locate_layers
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

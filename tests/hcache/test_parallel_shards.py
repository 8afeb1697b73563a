"""Layout math of tensor parallelism (hcache_adapter.parallel.shards, .stores): properties over random cases."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hcache_adapter.parallel.shards import Shard, assign_reads, chunk_owner, gathered_order, kv_heads_of_rank
from hcache_adapter.parallel.stores import slots_of_rank

holds_tables = st.integers(1, 5).flatmap(lambda world: st.integers(0, 12).flatmap(
    lambda m: st.lists(st.lists(st.booleans(), min_size=m, max_size=m), min_size=world, max_size=world)))


@given(holds_tables)
def test_every_held_chunk_is_read_once_by_a_rank_that_holds_it(holds):
    a = assign_reads(holds)
    for c, reader in enumerate(a.reader):
        if any(h[c] for h in holds):
            assert reader >= 0 and holds[reader][c]
        else:
            assert reader == -1
    for rank in range(len(holds)):  # a share's rows are its chunks in order
        assert [a.slot[c] for c in a.chunks_of(rank)] == list(range(a.count(rank)))


@given(holds_tables)
def test_the_saving_rank_reads_what_it_holds(holds):
    a = assign_reads(holds)
    for c in range(len(holds[0])):
        owner = chunk_owner(c, len(holds))
        if holds[owner][c]:
            assert a.reader[c] == owner


@given(st.integers(1, 8), st.integers(0, 40))
def test_when_every_rank_holds_everything_the_shares_differ_by_at_most_one(world, m):
    a = assign_reads([[True] * m for _ in range(world)])
    counts = [a.count(r) for r in range(world)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == m


@given(holds_tables, st.data())
def test_the_gather_puts_every_chunk_back_in_place(holds, data):
    """Simulate the all-gather: each rank's share (chunk ids, padded) concatenated by rank, then reordered."""
    a = assign_reads(holds)
    world, k = len(holds), a.share_rows
    share_valid = [data.draw(st.integers(0, a.count(r))) for r in range(world)]
    gathered = []
    for rank in range(world):
        rows = a.chunks_of(rank)
        gathered += [c if i < share_valid[rank] else -1 for i, c in enumerate(rows)] + [-2] * (k - len(rows))
    valid = a.valid_chunks(share_valid)
    assert [gathered[i] for i in gathered_order(a, valid)] == list(range(valid))
    if valid < len(a.reader):  # the chunk that ends the prefix was not held or not read
        r, s = a.reader[valid], a.slot[valid]
        assert r < 0 or s >= share_valid[r]


@given(st.integers(1, 16), st.integers(1, 8))
def test_node_slots_are_shared_out_once(slots, world):
    opened = [slots_of_rank(slots, world, r) for r in range(world)]
    every = sorted(j for js in opened for j in js)
    assert every == list(range(max(slots, world)))  # every slot opened by exactly one rank
    assert all(js[0] == r for r, js in enumerate(opened))  # its own slot first


def test_shard_keys_and_heads():
    assert Shard(1, 0).key_suffix == ""
    assert Shard(4, 3).key_suffix == ".tp4r3"
    assert [Shard(2, r).owns_chunk(5) for r in range(2)] == [False, True]
    assert list(kv_heads_of_rank(8, 4, 1)) == [2, 3]
    with pytest.raises(ValueError):
        kv_heads_of_rank(2, 4, 0)
    with pytest.raises(ValueError):
        Shard(2, 2)


def test_layout_keys_under_tensor_parallelism():
    """K/V keys name the shard, hidden-state keys do not; manifests with K/V layers carry the degree."""
    from hcache_adapter.layout import StateLayout

    base = StateLayout("fp", "hc", 16, torch.float32, 64, (2, 2), (16, 16))
    tp = StateLayout("fp", "hc", 16, torch.float32, 64, (1, 1), (16, 16), shard=Shard(2, 1))
    assert tp.chunk_key("d", "H", 0) == base.chunk_key("d", "H", 0)
    assert tp.chunk_key("d", "K", 0) == base.chunk_key("d", "K", 0) + ".tp2r1"
    assert tp.manifest("HK").kv_shards == 2 and tp.manifest("HH").kv_shards == 1
    assert tp.accepts(tp.manifest("HK")) and not base.accepts(tp.manifest("HK"))
    assert base.accepts(tp.manifest("HH")) and tp.accepts(base.manifest("HH"))

"""LayerLoader on its own: every layer arrives intact and in order, from DRAM and NVMe,
on the background thread and inline, with shallow and deep rings, and a missing
chunk cuts a layer's valid prefix where it is."""
from __future__ import annotations

import pytest
import torch

from hcache_adapter.loader import LayerLoader, LayerRead
from hstore import StoreConfig, TieredStore

LAYERS, CHUNKS, SHAPE = 6, 5, (8, 16)


def value(layer: int, chunk: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(layer * 100 + chunk)
    return torch.randn(SHAPE, generator=g)


@pytest.fixture
def filled(tmp_path):
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=1 << 20, nvme_bytes=8 << 20)) as store:
        for l in range(LAYERS):
            store.put_many([(f"{l}/{c}", value(l, c)) for c in range(CHUNKS)])
        yield store


def reads() -> list[LayerRead]:
    return [LayerRead(l, "H", [f"{l}/{c}" for c in range(CHUNKS)], SHAPE) for l in range(LAYERS)]


@pytest.mark.parametrize("source", ["dram", "nvme"])
@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("depth", [1, 2, LAYERS + 3])
def test_every_layer_arrives_intact(filled, source, inline, depth):
    if source == "nvme":
        filled.flush()
        filled.drop_cached()
    loader = LayerLoader(filled, reads(), torch.float32, torch.device("cpu"), depth=depth, inline=inline).start()
    try:
        loader.prefetch()
        for l in range(LAYERS):
            got = loader.get(l)
            assert got.valid_chunks == CHUNKS
            for c in range(CHUNKS):
                assert torch.equal(got.data[c], value(l, c)), (l, c)
            loader.release(l)
    finally:
        loader.close()
    assert loader.inline == inline


@pytest.mark.parametrize("inline", [False, True])
def test_a_missing_chunk_ends_the_valid_prefix(filled, inline):
    filled.delete("3/2")
    loader = LayerLoader(filled, reads(), torch.float32, torch.device("cpu"), depth=2, inline=inline).start()
    valid = []
    try:
        for l in range(LAYERS):
            valid.append(loader.get(l).valid_chunks)
            loader.release(l)
    finally:
        loader.close()
    assert valid == [CHUNKS, CHUNKS, CHUNKS, 2, CHUNKS, CHUNKS]


def test_thread_mode_lowers_the_switch_interval_only_while_it_runs(filled):
    import sys

    before = sys.getswitchinterval()
    loaders = [LayerLoader(filled, reads(), torch.float32, torch.device("cpu"), depth=2, inline=False).start()
               for _ in range(2)]
    assert sys.getswitchinterval() <= 0.0005
    loaders[0].close()
    assert sys.getswitchinterval() <= 0.0005  # the other restore still runs
    loaders[1].close()
    loaders[1].close()  # closing twice changes nothing
    assert sys.getswitchinterval() == before


def test_layer_keys_are_each_chunk_key():
    from hcache_adapter.layout import StateLayout

    from hcache_adapter.parallel.shards import Shard

    layout = StateLayout("fp", "ns", 64, torch.float16, 32, (4,) * 8, (8,) * 8, shard=Shard(2, 1))
    digests = ["ab12", "cd34", "ef56"]
    for kind, layer in (("H", 0), ("K", 7)):
        assert layout.layer_keys(digests, kind, layer) == [layout.chunk_key(d, kind, layer) for d in digests]
    assert layout.layer_keys([], "H", 0) == []


@pytest.mark.parametrize("lookahead", [None, 1, 2])
@pytest.mark.parametrize("lease", [0, 1, CHUNKS, 2 * CHUNKS + 1, 100])  # keys per lease (0: get_many_into per layer)
def test_inline_reads_with_and_without_leases_and_any_lookahead(filled, lookahead, lease, monkeypatch):
    if lease:
        monkeypatch.setattr(LayerLoader, "LEASE_KEYS", lease)
    filled.delete("4/2")  # layer 4 is read the general way and ends at chunk 2
    loader = LayerLoader(filled, reads(), torch.float32, torch.device("cpu"), depth=3, inline=True,
                         lookahead=lookahead, lease=bool(lease)).start()
    try:
        for l in range(LAYERS):
            got = loader.get(l)
            assert got.valid_chunks == (2 if l == 4 else CHUNKS)
            for c in range(got.valid_chunks):
                assert torch.equal(got.data[c], value(l, c)), (l, c)
            loader.release(l)
    finally:
        loader.close()



@pytest.mark.parametrize("bad", [0, -1, 1.5, "3"])
def test_a_bad_lookahead_is_refused(filled, bad):
    with pytest.raises(ValueError, match="lookahead"):
        LayerLoader(filled, reads(), torch.float32, torch.device("cpu"), lookahead=bad)


@pytest.mark.parametrize("first", [1, 2, LAYERS])
@pytest.mark.parametrize("depth", [2, LAYERS])
def test_an_inline_loader_extended_with_the_rest_delivers_every_layer(filled, first, depth):
    """A restore's first layers queued before its lookup built the other layers' keys (Restorer.begin)."""
    all_reads = reads()
    loader = LayerLoader(filled, all_reads[:first], torch.float32, torch.device("cpu"), depth=depth, inline=True,
                         expect_reads=LAYERS).start()
    try:
        assert loader.depth == min(depth, LAYERS)
        loader.prefetch(first)
        loader.extend(all_reads[first:])
        for l in range(LAYERS):
            got = loader.get(l)
            assert got.valid_chunks == CHUNKS
            assert all(torch.equal(got.data[c], value(l, c)) for c in range(CHUNKS)), l
            loader.release(l)
    finally:
        loader.close()


def test_only_an_inline_loader_with_room_can_be_extended(filled):
    threaded = LayerLoader(filled, reads()[:2], torch.float32, torch.device("cpu"), inline=False).start()
    try:
        with pytest.raises(RuntimeError, match="inline"):
            threaded.extend(reads()[2:])
    finally:
        threaded.close()
    inline = LayerLoader(filled, reads()[:2], torch.float32, torch.device("cpu"), inline=True).start()
    try:
        bigger = [LayerRead(2, "H", [f"2/{c}" for c in range(CHUNKS)], (16, 16))]
        with pytest.raises(ValueError, match="does not fit"):
            inline.extend(bigger)
    finally:
        inline.close()


def test_a_ring_allocates_its_buffers_and_staging_once_and_grows_them_when_asked():
    from hcache_adapter.loader import SlotRing

    ring = SlotRing(torch.device("cpu"))
    assert ring.lend(3, 4096) and ring.allocations == 3
    assert not ring.lend(3, 4096)  # lent
    ring.give_back()
    assert ring.lend(2, 4096) and ring.allocations == 3  # big enough already
    a = ring.staging_for(1, 8192)
    assert a.numel() >= 8192 and ring.allocations == 4
    a[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    b = ring.staging_for(1, 4096)
    assert b.data_ptr() == a.data_ptr() and ring.allocations == 4  # the same buffer again
    assert ring.staging_for(1, 16384).numel() >= 16384 and ring.allocations == 5  # grown
    ring.give_back()


def test_restores_sharing_a_ring_reuse_its_buffers(filled):
    from hcache_adapter.loader import SlotRing

    filled.flush()
    ring = SlotRing(torch.device("cpu"))
    seen = []
    for _ in range(2):
        filled.drop_cached()
        loader = LayerLoader(filled, reads(), torch.float32, torch.device("cpu"), depth=2, ring=ring).start()
        try:
            for i in range(LAYERS):
                got = loader.get(i)
                assert torch.equal(got.data[0], value(i, 0))
                loader.release(i)
        finally:
            loader.close()
        seen.append(ring.allocations)
    assert seen == [2, 2] and not ring.lent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_reads_from_nvme_stage_through_the_rings_pinned_buffers_once(filled):
    from hcache_adapter.loader import SlotRing

    filled.flush()
    ring = SlotRing(torch.device("cuda"))
    seen = []
    for _ in range(3):
        filled.drop_cached()
        loader = LayerLoader(filled, reads(), torch.float32, torch.device("cuda"), depth=2, ring=ring).start()
        try:
            assert not loader.inline
            for i in range(LAYERS):
                got = loader.get(i)
                assert torch.equal(got.data.cpu(), torch.stack([value(i, c) for c in range(CHUNKS)]))
                loader.release(i)
        finally:
            loader.close()
        seen.append(ring.allocations)
    assert seen == [4, 4, 4]  # 2 device slots, 2 staging buffers, first restore only
    assert all(s is not None and s.is_pinned() for s in ring.staging)

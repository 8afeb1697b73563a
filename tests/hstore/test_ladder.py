"""The tier ladder on real memory tiers: eviction follows the tier's policy and passes over pinned
and unwritten copies, the last copy of a value is demoted to the arena below instead of lost,
and callers see the tiers through read-only TierViews."""
from __future__ import annotations

import torch

from hstore.entry import NEEDS_DURABLE
from tests.helpers.store import memory_ladder, put_in_landing

KiB = 1 << 10


def test_eviction_passes_over_pinned_and_unwritten_copies():
    cat, ladder = memory_ladder(dram=64 * KiB)
    dram = ladder.landing
    es = [put_in_landing(cat, ladder, b"k%d" % i, torch.zeros(1024)) for i in range(16)]  # full: 16 x 4 KiB
    with cat.lock:
        cat.pin_locked([es[0].copies[dram.index]])
        cat.mark_pending_locked(es[1], NEEDS_DURABLE)
        loc = ladder.allocate_evicting_locked(dram, 4096)
    assert loc is not None and b"k2" not in cat.entries  # k0 pinned, k1 unwritten: k2 was the victim
    assert b"k0" in cat.entries and b"k1" in cat.entries
    assert cat.stats.dropped == 1 and dram.stats.evictions == 1


def test_the_last_copy_is_demoted_to_dram_not_lost():
    cat, ladder = memory_ladder(dram=64 * KiB, gpu=8 * KiB)
    gpu, dram = ladder.rungs
    e = put_in_landing(cat, ladder, b"a", torch.arange(1024.0))
    assert ladder.promote(e, gpu, torch.arange(1024.0))
    with cat.lock:
        cat.release_locked(cat.drop_copy_locked(e, dram.index))  # DRAM let it go: the GPU holds the only copy
    put_in_landing(cat, ladder, b"b", torch.ones(1024))
    f = cat.entries[b"b"]
    with cat.lock:
        assert ladder.allocate_evicting_locked(gpu, 8 * KiB) is not None  # evicts a from the GPU
    assert e.best == dram.index and gpu.stats.demotions == 1
    assert torch.equal(dram.tier.view(e.copies[dram.index]).view(torch.float32), torch.arange(1024.0))
    assert f.best == dram.index


def test_tier_views_describe_without_giving_the_tier_away():
    cat, ladder = memory_ladder(dram=64 * KiB, gpu=8 * KiB)
    views = ladder.describe()
    assert [(v.name, v.kind, v.order) for v in views] == [("gpu", "memory", 0), ("dram", "memory", 1)]
    dram = views[1]
    assert dram.capacity == 64 * KiB and dram.used == 0 and dram.free == 64 * KiB
    assert dram.footprint(1) == 4096 and dram.max_item_bytes == 64 * KiB and not dram.persistent
    put_in_landing(cat, ladder, b"k", torch.zeros(10))
    assert dram.used == 4096  # live
    assert not hasattr(dram, "allocate")

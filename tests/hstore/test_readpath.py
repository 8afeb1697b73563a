"""The read path's steps one by one, on a hand-built catalog and ladder of real memory tiers:
runs of adjacent slots (a property test), planning and pinning, copying by runs, releasing,
counting hits and misses per tier, and promotion into the faster tiers."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstore.readouts import BufferList, StackedRows
from hstore.readpath import (
    ReadPlan,
    account,
    adjacent_runs,
    copy_from_memory,
    plan_reads,
    promote_read,
    release,
)
from hstore.stats import StoreStats
from hstore.tiers.base import Location
from tests.helpers.store import memory_ladder as build
from tests.helpers.store import put_in_landing as put

KiB = 1 << 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 8), st.booleans()), max_size=30))
def test_runs_cover_every_read_once_and_are_adjacent_in_source_and_output(spec):
    reads, offset = [], 0
    for i, (rung, gap, _) in enumerate(spec):
        offset += gap * 4096
        reads.append((i, None, rung, Location("t", 0, offset, 4096, 4096)))
        offset += 4096
    rows = StackedRows(torch.empty(len(spec), 4096, dtype=torch.uint8))
    runs = adjacent_runs(reads, rows)
    assert [p for run in runs for p in run] == reads
    for run in runs:
        for a, b in zip(run, run[1:]):
            assert a[2] == b[2] and b[3].offset == a[3].offset + a[3].nbytes and b[0] == a[0] + 1
    for a, b in zip(runs, runs[1:]):  # maximal: a run ends only where adjacency breaks
        x, y = a[-1], b[0]
        assert not (x[2] == y[2] and y[3].offset == x[3].offset + x[3].nbytes and y[0] == x[0] + 1)


def test_plan_pins_copy_by_runs_then_release():
    cat, ladder = build()
    values = [torch.full((1024,), float(i)) for i in range(6)]  # 4 KiB each: adjacent slots
    for i, v in enumerate(values):
        put(cat, ladder, b"k%d" % i, v)
    keys = [b"k0", b"k1", b"nope", b"k3", b"k4", b"k5"]
    rows = StackedRows(torch.full((6, 1024), -1.0))
    plan = plan_reads(cat, keys, rows)
    assert plan.absent == [2] and [p[0] for p in plan.memory] == [0, 1, 3, 4, 5]
    assert all(cat.pinned(p[3]) for p in plan.memory)
    assert len(adjacent_runs(plan.memory, rows)) == 2  # k0-k1, and k3-k5 (row 2 breaks the run)
    copy_from_memory(plan, ladder, rows, non_blocking=False)
    release(cat, plan)
    assert not any(cat.pinned(p[3]) for p in plan.memory)
    assert plan.found == [True, True, False, True, True, True]
    for row, k in enumerate(keys):
        want = values[int(k[1:])] if k != b"nope" else torch.full((1024,), -1.0)
        assert torch.equal(rows.out[row], want)
    account(cat.stats, ladder, plan, len(keys))
    st = cat.stats
    assert (st.gets, st.hits, st.misses) == (6, 5, 1)
    assert st.tiers["dram"].hits == 5 and st.tiers["dram"].misses == 1
    assert cat.entries[b"k0"].hits == 1


def test_counting_when_reads_come_from_several_tiers():
    stats = StoreStats()
    _, ladder = build(gpu=64 * KiB)
    ladder.stats = stats
    for r in ladder.rungs:
        r.stats = stats.tier(r.name)

    class E:
        nbytes = 10

    plan = ReadPlan(memory=[(0, E, 0, None), (1, E, 1, None), (2, E, 1, None)], absent=[3], found=[True] * 3 + [False])
    account(stats, ladder, plan, 4)
    assert (stats.tiers["gpu"].hits, stats.tiers["gpu"].misses) == (1, 3)
    assert (stats.tiers["dram"].hits, stats.tiers["dram"].misses) == (2, 1)
    assert (stats.hits, stats.misses, stats.gets) == (3, 1, 4)


def test_a_read_from_dram_is_promoted_into_the_gpu_tier():
    cat, ladder = build(gpu=64 * KiB)
    put(cat, ladder, b"k", torch.arange(100.0))
    outs = BufferList([torch.empty(100)])
    plan = plan_reads(cat, [b"k"], outs)
    copy_from_memory(plan, ladder, outs, non_blocking=False)
    release(cat, plan)
    promote_read(ladder, plan, outs)
    e = cat.entries[b"k"]
    assert e.best == 0 and e.copies[0] is not None and ladder.rungs[0].stats.promotions == 1
    assert torch.equal(ladder.rungs[0].tier.view(e.copies[0]).view(torch.float32), torch.arange(100.0))

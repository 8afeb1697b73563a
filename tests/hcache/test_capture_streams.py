"""Capture streams: a stream is one group's until its owner and all its graphs are gone (see `capture_streams`).

The bookkeeping runs on plain objects here; on a GPU (skipped without CUDA) the streams are real, distinct from
torch's pool, and a group's graphs keep their results when another group's graphs are destroyed."""
from __future__ import annotations

import gc
import itertools

import pytest
import torch

from hcache_adapter.capture_streams import CaptureStream, StreamLeases



def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


class Thing:
    """Any object with a lifetime: an owner or a graph."""


def counting_leases():
    handles = itertools.count(100)
    return StreamLeases(lambda device: next(handles))


def test_a_stream_is_free_only_when_its_owner_and_every_graph_are_gone():
    leases = counting_leases()
    owner, graphs = Thing(), [Thing(), Thing()]
    lease = leases.lease(owner, 0)
    for g in graphs:
        lease.track(g)
    del owner, g
    gc.collect()
    assert leases.free(0) == []  # the graphs still use its workspace
    graphs.pop()
    gc.collect()
    assert leases.free(0) == []
    graphs.pop()
    gc.collect()
    assert leases.free(0) == [lease.handle]


def test_live_groups_never_share_a_stream_and_free_ones_are_reused():
    leases = counting_leases()
    owners = [Thing() for _ in range(3)]
    held = [leases.lease(o, 0) for o in owners]
    assert len({lease.handle for lease in held}) == 3
    first = held[0].handle
    del owners[0]
    gc.collect()
    assert leases.free(0) == [first]
    again = Thing()
    assert leases.lease(again, 0).handle == first
    assert leases.free(0) == [] and leases.created == 3


def test_free_lists_are_per_device_and_a_failed_creation_is_never_lent_again():
    handles = iter([7, 0])
    leases = StreamLeases(lambda device: next(handles))
    a, b = Thing(), Thing()
    assert leases.lease(a, 0).handle == 7
    assert leases.lease(b, 1).handle == 0  # none could be made: the caller falls back
    del a, b
    gc.collect()
    assert leases.free(0) == [7] and leases.free(1) == []


def test_a_lease_with_no_users_left_refuses_new_graphs():
    leases = counting_leases()
    owner = Thing()
    lease = leases.lease(owner, 0)
    del owner
    gc.collect()
    with pytest.raises(RuntimeError, match="after its owner"):
        lease.track(Thing())


@gpu
def test_capture_streams_are_distinct_from_each_other_and_from_torchs_pool():
    lanes = [CaptureStream("cuda") for _ in range(3)]
    assert all(lane.exclusive for lane in lanes)
    ours = {lane.stream.cuda_stream for lane in lanes}
    pool = {torch.cuda.Stream().cuda_stream for _ in range(80)}  # more than the pool holds per priority
    assert len(ours) == 3 and not ours & pool


@gpu
def test_a_groups_graphs_keep_their_results_when_another_groups_graphs_are_destroyed():
    """Skinny float16 GEMMs (cuBLAS splits K, in its workspace): group B replays right after group A's graphs,
    captured on an earlier stream, are destroyed and their memory handed out and overwritten."""
    x = torch.randn(32, 4096, device="cuda", dtype=torch.float16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    expected = x @ w

    def group():
        lane = CaptureStream("cuda")
        out = torch.empty_like(expected)
        torch.matmul(x, w, out=out)  # warm up (handles), off the graph
        g = lane.graph()
        lane.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(lane.stream):
            g.capture_begin()
            torch.matmul(x, w, out=out)
            g.capture_end()
        torch.cuda.current_stream().wait_stream(lane.stream)
        return lane, g, out

    a_lane, a, _ = group()
    b_lane, b, b_out = group()
    assert a_lane.stream.cuda_stream != b_lane.stream.cuda_stream
    del a_lane, a
    gc.collect()
    garbage = [torch.full((1 << 22,), 7.0, device="cuda") for _ in range(16)]  # reuse what A's reset freed
    for _ in range(5):
        b_out.zero_()
        b.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(b_out, expected, rtol=1e-3, atol=0.25)  # a split-K reduction's rounding
    del garbage
    c_lane = CaptureStream("cuda")  # A's stream, free again, serves the next group
    assert c_lane.exclusive

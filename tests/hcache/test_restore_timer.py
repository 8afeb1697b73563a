"""RestoreTimer: what auto's NVMe decisions cost, measured without the host waiting for the device."""
import time

import pytest
import torch

from hcache_adapter.loader import ReadTime, SlotRing
from hcache_adapter.scheduler.auto import SplitDecision
from hcache_adapter.scheduler.planner import RestoreEstimate
from hcache_adapter.scheduler.timing import PENDING_MAX, RestoreTimer

SPLIT = SplitDecision(28, RestoreEstimate(28, 0.1, 0.1, 0.1), 0.2, 4096, 32)
EVERYTHING = SplitDecision(32)


def _timer(device="cpu", costs=lambda: 0):
    seen = []
    timer = RestoreTimer(torch.device(device), costs, lambda d, o: seen.append((d, o)))
    return timer, seen


def test_cpu_split_is_learned_with_every_time_at_the_next_collect():
    timer, seen = _timer()
    t = timer.start(SPLIT, 4096)
    time.sleep(0.002)
    t.recomputed()
    time.sleep(0.002)
    t.restored(ReadTime(1 << 20, 0.001))
    time.sleep(0.002)
    t.answered()
    assert timer.collect() == 1
    (d, o), = seen
    assert d is SPLIT and (o.n_tokens, o.recompute_layers, o.counted) == (4096, 28, True)
    assert 0.002 <= o.recompute_s < o.restore_s < o.answer_s == o.ttft_s and o.answer_s >= 0.006
    assert (o.read_bytes, o.read_s) == (1 << 20, 0.001)
    assert timer.collect() == 0


def test_a_restore_without_a_first_forward_is_learned_once_the_next_request_starts():
    timer, seen = _timer()
    t = timer.start(SPLIT, 4096)
    t.restored()
    assert timer.collect() == 0  # its call may still run a forward
    timer.start(EVERYTHING, 4096).answered()
    assert timer.collect() == 2
    (d0, o0), (d1, o1) = seen
    assert o0.answer_s is None and o0.ttft_s == o0.restore_s and o0.read_bytes == 0
    assert d1 is EVERYTHING and o1.restore_s is None and o1.recompute_s is None and o1.answer_s is not None


def test_a_call_that_captured_graphs_is_kept_in_the_history_but_not_learned():
    captures = [0]
    timer, seen = _timer(costs=lambda: captures[0])
    t = timer.start(SPLIT, 4096)
    t.restored()
    captures[0] += 1  # the call captured the first forward's graphs
    t.answered()
    timer.start(EVERYTHING, 4096).answered()
    assert timer.collect() == 2
    assert [d for d, _ in seen] == [EVERYTHING]
    assert [o.counted for o in timer.history] == [False, True]


def test_a_call_that_allocated_restore_buffers_is_not_learned():
    """Pinning a 16K restore's staging costs tens of ms once: the request that paid it teaches nothing."""
    ring = SlotRing(torch.device("cpu"))
    timer, seen = _timer(costs=lambda: ring.allocations)
    for _ in range(2):
        t = timer.start(SPLIT, 4096)
        assert ring.lend(2, 1024)  # the first restore allocates its buffers; the second finds them
        t.restored()
        t.answered()
        ring.give_back()
    assert timer.collect() == 2
    assert len(seen) == 1 and [o.counted for o in timer.history] == [False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_marks_are_events_read_at_the_next_collect():
    timer, seen = _timer("cuda")
    t = timer.start(SPLIT, 4096)
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a.T / 4096
    t.recomputed()
    for _ in range(20):
        a = a @ a.T / 4096
    t.restored()
    for _ in range(20):
        a = a @ a.T / 4096
    t.answered()  # none waits for the device
    torch.cuda.synchronize()
    assert timer.collect() == 1
    (_, o), = seen
    assert 0 < o.recompute_s < o.restore_s < o.answer_s
    for _ in range(PENDING_MAX + 3):
        timer.start(EVERYTHING, 4096).answered()
    torch.cuda.synchronize()
    assert timer.collect() == PENDING_MAX  # bounded: the oldest unread ones are dropped

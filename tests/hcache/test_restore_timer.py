"""RestoreTimer: what auto's NVMe decisions cost, measured without the host waiting for the device."""
import time

import pytest
import torch

from hcache_adapter.scheduler.auto import SplitDecision
from hcache_adapter.scheduler.planner import RestoreEstimate
from hcache_adapter.scheduler.timing import PENDING_MAX, RestoreTimer

SPLIT = SplitDecision(28, RestoreEstimate(28, 0.1, 0.1, 0.1), 0.2, 4096)
EVERYTHING = SplitDecision(32)


def _timer(device="cpu", captures=lambda: 0):
    seen = {"split": [], "everything": []}
    timer = RestoreTimer(torch.device(device), captures, lambda d, s, a: seen["split"].append((d, s, a)),
                         lambda n, a: seen["everything"].append((n, a)))
    return timer, seen


def test_cpu_split_is_observed_with_both_times_at_the_next_collect():
    timer, seen = _timer()
    t = timer.start(SPLIT, 4096)
    time.sleep(0.002)
    t.restored()
    time.sleep(0.002)
    t.answered()
    assert timer.collect() == 1
    (d, restore_s, answer_s), = seen["split"]
    assert d is SPLIT and 0.002 <= restore_s < answer_s and answer_s >= 0.004
    assert timer.collect() == 0


def test_a_restore_without_a_first_forward_is_observed_once_the_next_request_starts():
    timer, seen = _timer()
    t = timer.start(SPLIT, 4096)
    t.restored()
    assert timer.collect() == 0  # its call may still run a forward
    timer.start(EVERYTHING, 4096).answered()
    assert timer.collect() == 2
    assert seen["split"][0][2] is None and len(seen["everything"]) == 1 and seen["everything"][0][0] == 4096


def test_a_call_that_captured_graphs_is_not_observed():
    captures = [0]
    timer, seen = _timer(captures=lambda: captures[0])
    t = timer.start(SPLIT, 4096)
    t.restored()
    captures[0] += 1  # the call captured the first forward's graphs
    t.answered()
    timer.start(SPLIT, 4096).answered()  # the next one captures nothing (and, never restored, teaches nothing)
    assert timer.collect() == 2
    assert seen == {"split": [], "everything": []}
    t = timer.start(EVERYTHING, 8192)
    t.answered()
    timer.collect()
    assert seen["everything"] == [(8192, pytest.approx(seen["everything"][0][1]))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_marks_are_events_read_at_the_next_collect():
    timer, seen = _timer("cuda")
    t = timer.start(SPLIT, 4096)
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a.T / 4096
    t.restored()
    for _ in range(20):
        a = a @ a.T / 4096
    t.answered()  # neither waits for the device
    torch.cuda.synchronize()
    assert timer.collect() == 1
    (_, restore_s, answer_s), = seen["split"]
    assert 0 < restore_s < answer_s
    for _ in range(PENDING_MAX + 3):
        timer.start(EVERYTHING, 4096).answered()
    torch.cuda.synchronize()
    assert timer.collect() == PENDING_MAX  # bounded: the oldest unread ones are dropped

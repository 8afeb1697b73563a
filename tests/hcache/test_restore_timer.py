"""RestoreTimer: split NVMe restores timed for auto without the host waiting for the device."""
import time

import pytest
import torch

from hcache_adapter.scheduler.timing import PENDING_MAX, RestoreTimer


def test_cpu_restore_is_observed_when_its_last_layer_is_taken():
    seen = []
    timer = RestoreTimer(torch.device("cpu"), lambda: 0, lambda d, s: seen.append((d, s)))
    done = timer.start("decision")
    time.sleep(0.002)
    assert seen == []
    done()
    assert len(seen) == 1 and seen[0][0] == "decision" and seen[0][1] >= 0.002
    assert timer.collect() == 0  # nothing left pending on a CPU


def test_a_call_that_captured_graphs_is_not_observed():
    captures = [0]
    seen = []
    timer = RestoreTimer(torch.device("cpu"), lambda: captures[0], lambda d, s: seen.append(s))
    done = timer.start("d")
    captures[0] += 1  # the call captured the first forward's graphs
    done()
    assert seen == []
    timer.start("d2")()  # the next call captures nothing
    assert len(seen) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_restore_is_observed_at_the_next_collect_from_its_events():
    seen = []
    timer = RestoreTimer(torch.device("cuda"), lambda: 0, lambda d, s: seen.append((d, s)))
    done = timer.start("d")
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a.T / 4096
    done()
    assert seen == []  # on_done does not wait for the device
    torch.cuda.synchronize()
    assert timer.collect() == 1
    assert seen[0][0] == "d" and seen[0][1] > 0
    for _ in range(PENDING_MAX + 3):
        timer.start("x")()
    torch.cuda.synchronize()
    assert timer.collect() == PENDING_MAX  # bounded: the oldest unread ones are dropped

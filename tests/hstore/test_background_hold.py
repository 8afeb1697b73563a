"""Holding the flusher back while latency-critical work runs (`TieredStore.hold_background`).

A real store on real files: while a hold is in force, the flusher writes nothing (it waits
at the gate); once released, everything becomes durable. A hold is bounded
(`background_max_hold_s`), and anything that waits for the flusher overrides it:
`flush()`, and a put that needs the flusher to free DRAM. No timing asserts: each test
waits for a condition, with a generous deadline that only a broken gate reaches.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from hstore import StoreConfig, TieredStore
from hstore.errors import StoreConfigError

DEADLINE_S = 30.0


def wait_for(condition, deadline_s: float = DEADLINE_S) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def nvme_written(store) -> int:
    return store.stats()["bytes_flushed"]


def open_store(tmp_path, **kw) -> TieredStore:
    return TieredStore(StoreConfig(root=tmp_path, dram_bytes=8 << 20, nvme_bytes=64 << 20, **kw))


def put(store, n: int, tag: str = "k") -> None:
    store.put_many([(f"{tag}{i}", torch.full((1024,), float(i))) for i in range(n)])


def in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_nothing_is_written_while_held_and_everything_after(tmp_path):
    with open_store(tmp_path, background_max_hold_s=60) as store:
        with store.hold_background():
            assert store.background_held == 1
            put(store, 8)
            assert wait_for(lambda: store.background_deferrals >= 1)  # the flusher waits at the gate
            assert nvme_written(store) == 0
        assert store.background_held == 0
        assert wait_for(lambda: nvme_written(store) > 0)
        assert store.flush().memory_only == ()
        store.drop_cached()
        assert torch.equal(store.get("k7"), torch.full((1024,), 7.0))


def test_a_hold_is_bounded(tmp_path):
    with open_store(tmp_path, background_max_hold_s=0.05) as store:
        hold = store.hold_background()
        put(store, 8)
        assert wait_for(lambda: nvme_written(store) > 0)  # went on after max_hold_s, still held
        assert store.background_held == 1
        hold.release()
        hold.release()  # once only
        assert store.background_held == 0


def test_flush_overrides_a_hold(tmp_path):
    with open_store(tmp_path, background_max_hold_s=60) as store:
        with store.hold_background():
            put(store, 8)
            assert wait_for(lambda: store.background_deferrals >= 1)
            done = threading.Event()
            t = in_thread(lambda: (store.flush(), done.set()))
            assert done.wait(DEADLINE_S), "flush() waited for the hold"
            t.join()
            assert nvme_written(store) > 0


def test_a_put_waiting_for_room_overrides_a_hold(tmp_path):
    """DRAM holds 8 MiB; 12 MiB of puts need the flusher to make DRAM clean before the last ones land."""
    with open_store(tmp_path, background_max_hold_s=60) as store:
        with store.hold_background():
            done = threading.Event()
            t = in_thread(lambda: ([store.put(f"big{i}", torch.zeros(1 << 18)) for i in range(12)], done.set()))
            assert done.wait(DEADLINE_S), "a put waiting for DRAM waited for the hold"
            t.join()
        assert store.flush().memory_only == ()


def test_holds_nest_and_a_zero_bound_disables_them(tmp_path):
    with open_store(tmp_path, background_max_hold_s=0) as store:
        a, b = store.hold_background(), store.hold_background()
        assert store.background_held == 2
        put(store, 4)
        assert wait_for(lambda: nvme_written(store) > 0)
        assert store.background_deferrals == 0
        a.release()
        assert store.background_held == 1
        b.release()


def test_close_is_not_held_up(tmp_path):
    store = open_store(tmp_path, background_max_hold_s=60)
    store.hold_background()  # never released
    put(store, 4)
    closed = threading.Event()
    t = in_thread(lambda: (store.close(), closed.set()))
    assert closed.wait(DEADLINE_S)
    t.join()
    with open_store(tmp_path) as again:
        assert torch.equal(again.get("k3"), torch.full((1024,), 3.0))


@pytest.mark.parametrize("bad", [-1, float("nan"), 61, True, "0.1"])
def test_bad_bounds_are_refused(tmp_path, bad):
    with pytest.raises(StoreConfigError, match="background_max_hold_s"):
        StoreConfig(root=tmp_path, background_max_hold_s=bad)

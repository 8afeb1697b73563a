"""Read leases on a real store: rows read by ranges equal what was put, keys not in a memory tier are
not leased, a lease is a snapshot under overwrites, deletes and eviction, its slots are freed when it
ends, bad outputs and closed leases raise, and a property test of runs against random puts."""
from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstore import InvalidItemError, StoreClosedError
from tests.helpers.store import assert_same, cold

ROW = 1024  # float32 elements: 4 KiB items lie back to back in the arena


def _value(i: int, version: int = 0) -> torch.Tensor:
    return torch.arange(ROW, dtype=torch.float32) + 1000.0 * i + 0.5 * version


def _put(store, keys, version=0, start=0):
    store.put_many([(k, _value(start + i, version)) for i, k in enumerate(keys)])


def test_rows_read_by_ranges_equal_what_was_put(open_store):
    store = open_store(nvme_bytes=0)
    keys = [f"k/{i}" for i in range(12)]
    _put(store, keys[:6])
    _put(store, keys[6:], start=6)  # a second put: another run
    with store.lease(keys) as lease:
        assert lease.found == [True] * 12 and lease.where == ["dram"] * 12 and lease.count(0, 12) == 12
        for start, stop in [(0, 12), (0, 6), (4, 9), (11, 12), (5, 5)]:
            out = torch.full((stop - start, ROW), -1.0)
            assert lease.read_into(start, stop, out) == [True] * (stop - start)
            for j in range(stop - start):
                assert_same(out[j], _value(start + j))


def test_keys_not_in_a_memory_tier_are_not_leased_and_their_rows_left_alone(open_store):
    store = open_store()
    on_disk = ["d/0", "d/1"]
    _put(store, on_disk)
    store.flush()
    cold(store)  # only the NVMe copies remain
    in_memory = ["m/0", "m/1"]
    _put(store, in_memory, start=5)
    keys = ["m/0", "d/0", "absent", "m/1", "d/1"]
    with store.lease(keys) as lease:
        assert lease.found == [True, False, False, True, False]
        assert lease.where == ["dram", None, None, "dram", None]
        out = torch.full((5, ROW), -1.0)
        assert lease.read_into(0, 5, out) == lease.found
        assert_same(out[0], _value(5))
        assert_same(out[3], _value(6))
        assert bool((out[1] == -1).all() and (out[2] == -1).all() and (out[4] == -1).all())


def test_a_lease_is_a_snapshot_and_frees_replaced_slots_when_it_ends(open_store):
    store = open_store(nvme_bytes=0)
    keys = [f"k/{i}" for i in range(4)]
    _put(store, keys)
    used = store.stats()["tiers"]["dram"]["used"]
    lease = store.lease(keys)
    _put(store, keys[:2], version=1)  # overwritten while leased
    store.delete(keys[3])  # deleted while leased
    out = torch.empty(4, ROW)
    assert lease.read_into(0, 4, out) == [True] * 4
    for i in range(4):
        assert_same(out[i], _value(i))  # the leased values
    assert store.stats()["tiers"]["dram"]["used"] > used  # the old slots are still held
    lease.close()
    assert lease.closed
    store.get_many(keys)  # the next read finishes deferred work
    assert store.stats()["tiers"]["dram"]["used"] == used - 4096  # three values: two new, one old; one deleted
    assert_same(store.get(keys[0]), _value(0, 1))
    assert store.get(keys[3]) is None


def test_leased_values_survive_eviction(open_store):
    store = open_store(dram_bytes=64 << 10, nvme_bytes=0)  # 16 items fit
    keys = [f"k/{i}" for i in range(8)]
    _put(store, keys)
    with store.lease(keys) as lease:
        for j in range(40):  # pushes every unpinned item out
            store.put(f"other/{j}", _value(100 + j))
        out = torch.empty(8, ROW)
        assert lease.read_into(0, 8, out) == [True] * 8
        for i in range(8):
            assert_same(out[i], _value(i))


def test_bad_outputs_and_closed_leases_raise(open_store):
    store = open_store(nvme_bytes=0)
    keys = [f"k/{i}" for i in range(3)]
    _put(store, keys)
    lease = store.lease(keys)
    with pytest.raises(ValueError, match="rows"):
        lease.read_into(0, 3, torch.empty(2, ROW))
    with pytest.raises(ValueError, match="within"):
        lease.read_into(2, 4, torch.empty(2, ROW))
    with pytest.raises(InvalidItemError):
        lease.read_into(0, 3, torch.empty(3, ROW, dtype=torch.float16))
    with pytest.raises(InvalidItemError):
        lease.read_into(0, 3, torch.empty(3, ROW + 1))
    with pytest.raises(InvalidItemError):
        lease.read_into(0, 3, torch.empty(ROW, 3).t())  # not contiguous
    lease.close()
    lease.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        lease.read_into(0, 3, torch.empty(3, ROW))


def test_a_range_after_a_gap_of_unleased_keys_is_checked_against_out(open_store):
    store = open_store(nvme_bytes=0)
    _put(store, ["a", "b"])
    with store.lease(["a", "absent", "b"]) as lease:
        with pytest.raises(InvalidItemError):
            lease.read_into(1, 3, torch.empty(2, ROW // 2))  # run "a" ends before row 1; run "b" must be checked
        out = torch.full((2, ROW), -1.0)
        assert lease.read_into(1, 3, out) == [False, True]
        assert_same(out[1], _value(1))


def test_store_closed_under_a_lease(open_store):
    store = open_store(nvme_bytes=0)
    _put(store, ["a"])
    lease = store.lease(["a"])
    store.close()
    with pytest.raises(StoreClosedError):
        lease.read_into(0, 1, torch.empty(1, ROW))
    lease.close()  # nothing left to release
    with pytest.raises(StoreClosedError):
        store.lease(["a"])


def test_an_abandoned_lease_releases_its_slots(open_store):
    store = open_store(nvme_bytes=0)
    _put(store, ["a"])
    lease = store.lease(["a"])
    store.delete("a")
    assert store.stats()["tiers"]["dram"]["used"] == 4096
    del lease
    gc.collect()
    assert store.stats()["tiers"]["dram"]["used"] == 0


def test_leases_count_as_hits(open_store):
    store = open_store(nvme_bytes=0)
    _put(store, ["a", "b"])
    with store.lease(["a", "b", "c"]):
        pass
    stats = store.stats()
    assert stats["tiers"]["dram"]["hits"] == 2 and stats["hits"] == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from([torch.float32, torch.float16]), st.booleans(),
                          st.integers(0, 2)), min_size=1, max_size=8),
       st.data())
def test_property_any_range_of_a_lease_reads_what_get_returns(tmp_path_factory, groups, data):
    """Random batches (sizes, dtypes, some keys overwritten, absent keys between them): runs never cross a
    size, dtype or slot gap, and rows of keys not leased are left as they were."""
    from hstore import StoreConfig, TieredStore

    root = tmp_path_factory.mktemp("lease")
    with TieredStore(StoreConfig(root=root, dram_bytes=1 << 20, nvme_bytes=0, gpu_bytes=0)) as store:
        keys, n = [], 0
        for size, dtype, overwrite, absent in groups:
            batch = [f"g/{n + j}" for j in range(size)]
            store.put_many([(k, torch.full((ROW * size,), float(n + j)).to(dtype)) for j, k in enumerate(batch)])
            if overwrite:
                store.put(batch[0], torch.full((ROW * size,), -float(n)).to(dtype))  # moves it to another slot
            keys += batch + [f"absent/{n}/{j}" for j in range(absent)]
            n += size
        want = store.get_many(keys)
        start = data.draw(st.integers(0, len(keys) - 1))
        stop = data.draw(st.integers(start + 1, len(keys)))
        with store.lease(keys) as lease:
            assert lease.found == [w is not None for w in want]
            j = start
            while j < stop:  # read maximal ranges whose present keys share one dtype and size
                kind = next(((w.dtype, w.numel()) for w in want[j:stop] if w is not None), None)
                if kind is None:
                    break
                k = j
                while k < stop and (want[k] is None or (want[k].dtype, want[k].numel()) == kind):
                    k += 1
                out = torch.full((k - j, kind[1]), 7.0).to(kind[0])
                assert lease.read_into(j, k, out) == [want[i] is not None for i in range(j, k)]
                for i in range(j, k):
                    if want[i] is None:
                        assert bool((out[i - j] == 7).all())
                    else:
                        assert_same(out[i - j], want[i])
                j = k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_non_blocking_reads_into_the_gpu_keep_their_sources_until_done(open_store):
    store = open_store(nvme_bytes=0, dram_bytes=4 << 20)
    keys = [f"k/{i}" for i in range(64)]
    _put(store, keys)
    out = torch.empty(64, ROW, device="cuda")
    with store.lease(keys) as lease:
        assert lease.read_into(0, 64, out, non_blocking=True) == [True] * 64
    for k in keys:
        store.delete(k)  # freed only after the copy has run
    torch.cuda.synchronize()
    for i in range(64):
        assert_same(out[i].cpu(), _value(i))

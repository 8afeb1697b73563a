"""The Catalog alone, through its public interface: a fake index and callbacks that record what
was freed stand in for the tiers, so every rule (replacement, pins, pending frees, deferred
unpins, the dirty queue, commit of a batch while the key is overwritten, durable eviction)
is checked without a store around it."""
from __future__ import annotations

import threading

import pytest
import torch

from hstore.catalog import Catalog
from hstore.entry import NEEDS_DURABLE, NEEDS_REMOTE
from hstore.errors import StoreClosedError, StoreIOError
from hstore.policy import LruPolicy
from hstore.stats import StoreStats
from hstore.tiers.base import Location

DRAM, NVME = 0, 1


class FakeIndex:
    """An IndexWriter over a dict; `hook(entries)` runs inside put_many (as a racing thread would)."""

    def __init__(self):
        self.records: dict[bytes, object] = {}
        self.hook = None
        self.fail = False

    def put_many(self, entries):
        if self.fail:
            raise StoreIOError("index write failed")
        entries = list(entries)
        for e in entries:
            self.records[e.key] = e
        if self.hook is not None:
            self.hook(entries)

    def delete_many(self, keys):
        if self.fail:
            raise StoreIOError("index write failed")
        for k in keys:
            self.records.pop(k, None)


class Harness:
    def __init__(self, durable: bool = True):
        self.freed: list[Location] = []
        self.index = FakeIndex()
        self.stats = StoreStats()
        self.next_offset = 0
        self.cat = Catalog([LruPolicy(), LruPolicy()] if durable else [LruPolicy()], landing=DRAM,
                           durable=NVME if durable else None, free=self.freed.append,
                           view=lambda loc: torch.zeros(loc.nbytes, dtype=torch.uint8), index=self.index,
                           stats=self.stats)

    def loc(self, tier: str = "dram", nbytes: int = 100) -> Location:
        self.next_offset += 4096
        return Location(tier, 0, self.next_offset, 4096 if tier == "dram" else 8192, nbytes)

    def put(self, key: bytes, pending: int = NEEDS_DURABLE, memory_only: bool = False):
        cat = self.cat
        with cat.lock:
            e = cat.new_entry_locked(key, torch.uint8, (100,), 100, None, 0.0)
            cat.install_locked(e, pending, memory_only)
            cat.add_copy_locked(e, DRAM, self.loc())
        return e

    def flush_all(self):
        batch = self.cat.next_batch(1 << 30, wait_s=0)
        locs = [self.loc("nvme") if d else None for d in batch.durable]
        self.cat.commit(batch, locs, [None] * len(locs))
        self.cat.finish(batch)
        return batch, locs


def test_overwrite_releases_the_old_copies_and_keeps_the_old_record_indexed_until_commit():
    h = Harness()
    old = h.put(b"k")
    _, (rec,) = h.flush_all()
    assert h.cat.indexed[b"k"] is rec and old.best == DRAM  # DRAM copy first, the record behind it
    old_copy = old.copies[DRAM]
    new = h.put(b"k")
    assert h.freed == [old_copy] and old.best == -1
    assert h.cat.indexed[b"k"] is rec  # still what the index holds: the old value's own record
    assert new.copies[NVME] is None  # the new value has no durable copy of its own yet
    assert list(h.cat.dirty) == [b"k"]
    _, (rec2,) = h.flush_all()
    assert h.cat.indexed[b"k"] is rec2 and new.copies[NVME] is rec2 and rec in h.freed
    assert h.index.records[b"k"].offset == rec2.offset


def test_a_pinned_location_is_freed_when_its_last_reader_unpins():
    h = Harness()
    e = h.put(b"k", pending=0)
    loc = e.copies[DRAM]
    with h.cat.lock:
        h.cat.pin_locked([loc, loc])
        h.cat.drop_volatile_locked(e)
    assert loc not in h.freed
    with h.cat.lock:
        h.cat.unpin_locked([loc])
        assert loc not in h.freed
        h.cat.unpin_locked([loc])
    assert h.freed == [loc] and not h.cat.pinned(loc)


class FakeEvent:
    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def test_deferred_unpins_wait_for_their_event():
    h = Harness()
    e = h.put(b"k", pending=0)
    loc, ev = e.copies[DRAM], FakeEvent()
    with h.cat.lock:
        h.cat.pin_locked([loc])
        h.cat.defer_unpin_locked(ev, [loc])
        h.cat.drop_volatile_locked(e)
    h.cat.finish_deferred(wait=False)
    assert h.cat.pinned(loc) and loc not in h.freed
    ev.done = True
    h.cat.finish_deferred(wait=False)
    assert h.freed == [loc]


def test_batches_come_in_put_order_pinned_and_within_size():
    h = Harness()
    for i in range(5):
        h.put(b"k%d" % i, pending=NEEDS_DURABLE | (NEEDS_REMOTE if i % 2 else 0))
    batch = h.cat.next_batch(250, wait_s=0)
    assert [e.key for e in batch.entries] == [b"k0", b"k1"]
    assert batch.remote == [False, True] and batch.durable == [True, True]
    assert all(h.cat.pinned(e.flushing) for e in batch.entries)
    second = h.cat.next_batch(1 << 20, wait_s=0)  # entries being flushed are not handed out twice
    assert [e.key for e in second.entries] == [b"k2", b"k3", b"k4"]
    h.cat.abort(batch, StoreIOError("disk on fire"))
    h.cat.finish(batch)
    assert h.cat.flush_failures == 1 and list(h.cat.dirty)[:2] == [b"k0", b"k1"]  # still dirty
    assert not any(h.cat.pinned(e.copies[DRAM]) for e in batch.entries)


def test_commit_of_a_value_overwritten_while_its_index_entry_is_written():
    # The race the store's test once reached through a private: a put lands while the flusher
    # writes the previous value's index entry. The catalog must learn what the index holds, so a
    # delete then leaves nothing indexed and no record's space leaks.
    h = Harness()
    h.put(b"a")

    def overwrite(entries):
        h.index.hook = None
        h.put(b"a")

    h.index.hook = overwrite
    _, (rec,) = h.flush_all()
    assert h.cat.indexed[b"a"] is rec  # the index holds the old value's record: the catalog knows
    assert h.cat.entries[b"a"].copies[NVME] is None and list(h.cat.dirty) == [b"a"]
    with h.cat.commit_lock:
        with h.cat.lock:
            h.cat.remove_locked(b"a")
        h.cat.drop_indexed_committing([b"a"])
    assert h.index.records == {} and rec in h.freed and h.cat.indexed == {}
    assert h.cat.dirty == {} and h.cat.entries == {}


def test_commit_of_a_deleted_value_frees_its_new_record():
    h = Harness()
    h.put(b"a")
    batch = h.cat.next_batch(1 << 20, wait_s=0)
    with h.cat.lock:
        h.cat.remove_locked(b"a")
    rec = h.loc("nvme")
    h.cat.commit(batch, [rec], [None])
    h.cat.finish(batch)
    assert rec in h.freed and h.index.records == {} and h.cat.indexed == {}


def test_a_failed_index_write_leaves_the_batch_dirty_and_frees_its_records():
    h = Harness()
    h.put(b"a")
    batch = h.cat.next_batch(1 << 20, wait_s=0)
    h.index.fail = True
    rec = h.loc("nvme")
    with pytest.raises(StoreIOError):
        h.cat.commit(batch, [rec], [None])
    h.cat.finish(batch)
    assert rec in h.freed and list(h.cat.dirty) == [b"a"] and h.cat.indexed == {}


def test_durable_eviction_skips_pinned_records_and_forgets_entries_without_copies():
    h = Harness()
    for k in (b"a", b"b", b"c"):
        h.put(k)
    h.flush_all()
    for k in (b"a", b"b", b"c"):
        with h.cat.lock:
            h.cat.drop_volatile_locked(h.cat.entries[k])
    pinned = h.cat.indexed[b"a"]
    with h.cat.lock:
        h.cat.pin_locked([pinned])
    assert h.cat.evict_durable(8192) == 8192
    assert b"a" in h.cat.indexed and b"b" not in h.cat.indexed and b"b" not in h.cat.entries
    assert h.stats.dropped == 1 and h.stats.tiers["nvme"].evictions == 1
    assert set(h.index.records) == {b"a", b"c"}


def test_drop_indexed_only_drops_the_location_it_was_told():
    h = Harness()
    h.put(b"k")
    _, (old,) = h.flush_all()
    h.put(b"k")
    h.flush_all()  # a newer record replaced `old` meanwhile
    assert h.cat.drop_indexed([b"k"], only=[old]) == 0 and b"k" in h.index.records
    assert h.cat.drop_indexed([b"k"]) == 1 and h.index.records == {}


def test_memory_only_keys_and_waiting_for_writes():
    h = Harness()
    h.put(b"a", pending=0, memory_only=True)
    h.put(b"b")
    target = h.cat.seq
    h.put(b"c", pending=0, memory_only=True)
    assert h.cat.memory_only_keys(target) == (b"a",)
    waiter_error: list[BaseException] = []

    def wait():
        try:
            h.cat.wait_written(target, lambda: True, poll_s=0.01)
        except BaseException as e:  # noqa: BLE001
            waiter_error.append(e)

    t = threading.Thread(target=wait)
    t.start()
    batch = h.cat.next_batch(1 << 20, wait_s=0)
    h.cat.abort(batch, StoreIOError("EIO"))
    h.cat.finish(batch)
    t.join(10)
    assert isinstance(waiter_error[0], StoreIOError)
    h.flush_all()
    h.cat.wait_written(target, lambda: True)  # returns: nothing put before `target` is owed any more
    h.cat.close()
    with pytest.raises(StoreClosedError):
        with h.cat.operation():
            pass

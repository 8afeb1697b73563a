"""The Flusher against a fake catalog (a FlushSource that hands out batches and records what
came back), a real NVMe tier on real files behind a fault-injecting engine, and the in-process
remote tier: what is written where, what a full tier and a failing device do, that the remote
tier's failures never fail a batch, and that every batch is finished whatever happens."""
from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field

import pytest
import torch

from hstore.catalog import FlushBatch
from hstore.errors import StoreIOError, TierFullError
from hstore.flusher import Flusher
from hstore.io import ThreadPoolEngine
from hstore.policy import RoundRobinPlacement
from hstore.testing import DictRemoteTier, FaultyEngine
from hstore.tiers.base import DurableRead, ReadStatus, WriteItem
from hstore.tiers.nvme import NvmeTier

MiB = 1 << 20


@dataclass
class FakeSource:
    """A FlushSource over a list of batches; records commits, aborts and finishes."""

    batches: list[FlushBatch]
    closed: bool = False
    committed: list[tuple] = field(default_factory=list)
    aborted: list[BaseException] = field(default_factory=list)
    finished: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def next_batch(self, max_bytes: int):
        if not self.batches:
            self.done.set()
            self.done.wait(0.01)
            return None
        return self.batches[0]

    def commit(self, batch, locs, remote):
        self.committed.append((batch, list(locs), list(remote)))
        self.batches.pop(0)

    def abort(self, batch, error):
        self.aborted.append(error)

    def finish(self, batch):
        self.finished += 1


def batch(n: int, *, durable=True, remote=True) -> FlushBatch:
    items = [WriteItem(b"k%d" % i, torch.full((3000,), i, dtype=torch.uint8), torch.uint8, (3000,)) for i in range(n)]
    return FlushBatch([None] * n, items, [durable] * n, [remote] * n)


@pytest.fixture
def tier(tmp_path):
    engine = FaultyEngine(ThreadPoolEngine(2))
    t = NvmeTier([tmp_path / "nvme"], 1 * MiB, engine, RoundRobinPlacement())
    yield t
    t.close()
    engine.close()


def run(source: FakeSource, **kw) -> Flusher:
    f = Flusher(source, **{"durable": None, "remote": None, "make_room": lambda need: 0, "batch_bytes": MiB, **kw})
    f.start()
    assert source.done.wait(30)
    f.stop()
    return f


def read_back(tier: NvmeTier, item: WriteItem, loc) -> ReadStatus:
    out = torch.empty(item.payload.numel(), dtype=torch.uint8)
    (status,) = tier.read_many([DurableRead(item.key, item.dtype, item.shape, loc, out)])
    assert status != ReadStatus.OK or torch.equal(out, item.payload)
    return status


def test_a_batch_goes_to_the_durable_and_remote_tiers_then_commits(tier):
    remote = DictRemoteTier()
    b = batch(3)
    b.durable[1] = False  # memory-only for the durable tier, shared all the same
    source = FakeSource([b])
    run(source, durable=tier, remote=remote)
    (done, locs, shared), = source.committed
    assert locs[1] is None and all(read_back(tier, b.items[i], locs[i]) == ReadStatus.OK for i in (0, 2))
    assert shared == [True, True, True] and sorted(remote.keys()) == [b"k0", b"k1", b"k2"]
    assert source.finished == 1 and source.aborted == []


def test_a_remote_that_fails_never_fails_the_batch(tier):
    remote = DictRemoteTier()
    remote.reachable = False
    source = FakeSource([batch(2)])
    run(source, durable=tier, remote=remote)
    (_, locs, shared), = source.committed
    assert shared == [False, False] and all(loc is not None for loc in locs)


def test_only_the_remote_without_a_durable_tier():
    remote = DictRemoteTier()
    source = FakeSource([batch(2, durable=False)])
    run(source, remote=remote)
    (_, locs, shared), = source.committed
    assert locs == [None, None] and shared == [True, True]


def item(key: bytes, nbytes: int) -> WriteItem:
    return WriteItem(key, torch.zeros(nbytes, dtype=torch.uint8), torch.uint8, (nbytes,))


def test_a_full_durable_tier_asks_for_room_then_fails_the_batch_for_now(tier):
    (filler,) = tier.write_many([item(b"filler", 200 * 1024)])
    asked: list[int] = []

    def make_room(need: int) -> int:  # what the catalog does: evict records, say how many bytes
        asked.append(need)
        if len(asked) == 1:
            tier.free(filler)
            return filler.length
        return 0

    big = FlushBatch([None], [item(b"big", 900 * 1024)], [True], [False])
    source = FakeSource([big])
    f = Flusher(source, durable=tier, remote=None, make_room=make_room, batch_bytes=MiB)
    f.flush_batch(big)
    assert asked == [tier.footprint(900 * 1024)]
    (_, (loc,), _), = source.committed
    assert read_back(tier, big.items[0], loc) == ReadStatus.OK
    with pytest.raises(TierFullError):  # nothing more can be evicted: the batch fails, to be retried later
        f.flush_batch(FlushBatch([None], [item(b"more", 600 * 1024)], [True], [False]))
    assert len(asked) == 2


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_a_device_error_aborts_the_batch_and_it_is_retried(tier, code):
    tier.engine.fail(code, write=True, times=2)
    source = FakeSource([batch(2)])
    run(source, durable=tier)
    assert len(source.aborted) == 2 and all(isinstance(e, StoreIOError) and e.errno == code for e in source.aborted)
    assert len(source.committed) == 1 and source.finished == 3  # finished after every attempt
    (b, locs, _), = source.committed
    assert all(read_back(tier, it, loc) == ReadStatus.OK for it, loc in zip(b.items, locs))
    assert tier.used == 2 * tier.footprint(3000)  # the failed attempts' space was given back


def test_stop_while_the_device_fails_gives_up_and_finishes_the_batch(tier):
    tier.engine.fail(errno.EIO, write=True)
    source = FakeSource([batch(1)])
    f = Flusher(source, durable=tier, remote=None, make_room=lambda need: 0, batch_bytes=MiB)
    f.start()
    f.stop()
    assert not f.alive and source.committed == [] and source.finished >= 1 and tier.used == 0

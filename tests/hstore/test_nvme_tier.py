"""The NVMe tier alone, on real files and both engines: records round trip, every read is checked
against what the index expects (key, dtype, shape, size, checksum), space is packed, striped and
reserved, and a scan of the files finds exactly the records that verify."""
from __future__ import annotations

import os

import pytest
import torch

from hstore.buffers import ALIGN
from hstore.errors import StoreConfigError, TierFullError
from hstore.io import make_engine
from hstore.policy import RoundRobinPlacement
from hstore.record import HEADER_BYTES, MAX_INLINE_KEY
from hstore.tiers.base import DurableRead, Location, ReadStatus, WriteItem
from hstore.tiers.nvme import NvmeTier

MiB = 1 << 20


@pytest.fixture
def make_tier(tmp_path, engine_kind):
    opened = []

    def make(n_dirs: int = 1, capacity: int = 4 * MiB) -> NvmeTier:
        engine = make_engine(engine_kind, queue_depth=16, workers=2)
        t = NvmeTier([tmp_path / f"d{i}" for i in range(n_dirs)], capacity, engine, RoundRobinPlacement())
        opened.append((t, engine))
        return t

    yield make
    for t, engine in opened:
        t.close()
        engine.close()


def item(key: bytes, t: torch.Tensor) -> WriteItem:
    t = t.contiguous()
    return WriteItem(key, t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8),
                     t.dtype, tuple(t.shape))


def read(tier, key, dtype, shape, loc) -> tuple[ReadStatus, torch.Tensor]:
    out = torch.empty(loc.nbytes, dtype=torch.uint8)
    (status,) = tier.read_many([DurableRead(key, dtype, shape, loc, out)])
    return status, out


def test_records_round_trip_and_reads_check_what_the_index_expects(make_tier):
    tier = make_tier()
    values = [torch.arange(1000, dtype=torch.float32), torch.arange(6, dtype=torch.int16).reshape(2, 3),
              torch.empty(0, dtype=torch.float16), torch.randn(3000)]
    items = [item(b"k%d" % i, v) for i, v in enumerate(values)]
    locs = tier.write_many(items)
    assert [loc.length for loc in locs] == [tier.footprint(it.payload.numel()) for it in items]
    for it, loc in zip(items, locs):
        status, out = read(tier, it.key, it.dtype, it.shape, loc)
        assert status == ReadStatus.OK and torch.equal(out, it.payload)
    k0, loc0 = items[0], locs[0]
    # the same bytes read as another key, dtype or shape: the header tells them apart
    assert read(tier, b"other", k0.dtype, k0.shape, loc0)[0] == ReadStatus.CORRUPT
    assert read(tier, k0.key, torch.int32, k0.shape, loc0)[0] == ReadStatus.CORRUPT
    assert read(tier, k0.key, k0.dtype, (10, 100), loc0)[0] == ReadStatus.CORRUPT
    wrong_sum = Location(loc0.tier, loc0.device, loc0.offset, loc0.length, loc0.nbytes, loc0.checksum ^ 1)
    assert read(tier, k0.key, k0.dtype, k0.shape, wrong_sum)[0] == ReadStatus.CORRUPT


def test_a_batch_is_packed_back_to_back_and_striped_over_devices(make_tier):
    tier = make_tier(n_dirs=2)
    locs = tier.write_many([item(b"k%d" % i, torch.ones(1000)) for i in range(6)])
    assert sorted(loc.device for loc in locs) == [0, 0, 0, 1, 1, 1]
    for dev in (0, 1):
        offs = sorted(loc.offset for loc in locs if loc.device == dev)
        assert offs == [offs[0] + i * tier.footprint(4000) for i in range(3)]


def test_space_is_freed_reserved_and_refused_when_full(make_tier):
    tier = make_tier(capacity=1 * MiB)
    assert tier.max_item_bytes == 1 * MiB - HEADER_BYTES
    (loc,) = tier.write_many([item(b"a", torch.zeros(tier.max_item_bytes, dtype=torch.uint8))])
    assert tier.used == tier.capacity
    with pytest.raises(TierFullError):
        tier.write_many([item(b"b", torch.zeros(10))])
    tier.free(loc)
    assert tier.used == 0
    assert tier.reserve(loc) and not tier.reserve(loc)  # a second claim on the same extent overlaps
    bad = Location("nvme", 5, 0, loc.length, loc.nbytes)
    assert not tier.reserve(bad)
    assert not tier.reserve(Location("nvme", 0, 0, 3, loc.nbytes))  # a length the record cannot have


def test_too_small_a_tier_is_a_config_error(tmp_path):
    with pytest.raises(StoreConfigError):
        NvmeTier([tmp_path / "d"], HEADER_BYTES, make_engine("threads"), RoundRobinPlacement())


def test_scan_finds_the_records_that_verify_newest_sequence_last(make_tier):
    tier = make_tier(n_dirs=2)
    long_key = b"L" * (MAX_INLINE_KEY + 1)
    items = [item(b"a", torch.ones(1000)), item(b"b", torch.arange(5000)), item(long_key, torch.ones(3))]
    locs = tier.write_many(items)
    (again,) = tier.write_many([item(b"a", torch.zeros(10))])
    # damage b's payload: its checksum no longer verifies
    b = locs[1]
    with open(tier.paths[b.device], "r+b") as f:
        f.seek(b.offset + HEADER_BYTES + 7)
        f.write(b"\xff")
        f.flush()
        os.fsync(f.fileno())
    found = list(tier.scan())
    by_key = {}
    for rec in found:
        by_key.setdefault(rec.key, []).append(rec)
    assert b"b" not in by_key
    assert by_key[None][0].dtype == torch.float32 and by_key[None][0].shape == (3,)  # digest only
    a_old, a_new = sorted(by_key[b"a"], key=lambda r: r.seq)
    assert (a_old.loc.offset, a_old.loc.device) == (locs[0].offset, locs[0].device)
    assert (a_new.loc.offset, a_new.loc.device) == (again.offset, again.device) and a_new.shape == (10,)
    assert all(r.version == 2 and r.loc.offset % ALIGN == 0 for r in found)

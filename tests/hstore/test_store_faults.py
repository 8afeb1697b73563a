"""TieredStore when the device misbehaves: corrupt bytes on disk, I/O errors, short
transfers, failed fsyncs, a full disk. Faults are injected by FaultyEngine around a
real engine (both kinds) writing real files, or by editing the data file itself.

The rules under test: a bad chunk is a miss (counted, logged, dropped, and still
a miss after reopen), never wrong data; a failed write surfaces as StoreIOError
from flush() and leaves no index entry pointing at unwritten data, while the item
stays readable from DRAM; the store recovers once the fault clears.
"""
from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from hstore import StoreConfigError, StoreIOError, TieredStore
from hstore.index import Index, IndexEntry
from hstore.testing import data_file_fd
from hstore.record import HEADER_BYTES
from hstore.format import DATA_FILE
from tests.helpers.store import assert_same, find_record, keyed_tensor, scan_root

KiB = 1 << 10
MiB = 1 << 20


def values_for(keys, n=3000):
    return {k: torch.arange(n, dtype=torch.float32) + i for i, k in enumerate(keys)}


def data_file(cfg) -> Path:
    return Path(cfg.root) / "nvme" / DATA_FILE


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def fill(cfg, values) -> None:
    """Put `values` into the store at `cfg` and close it (which flushes them)."""
    with TieredStore(cfg) as store:
        for k, v in values.items():
            store.put(k, v)


@contextmanager
def edited_index(cfg):
    """The closed store's LMDB index, open for hand-made damage."""
    idx = Index(Path(cfg.root) / "index")
    try:
        yield idx
    finally:
        idx.close()


def cold_store(open_store, cfg, values) -> TieredStore:
    """An open store holding `values` on NVMe only (flushed, cached copies dropped)."""
    store = open_store(cfg)
    for k, v in values.items():
        store.put(k, v)
    store.flush()
    store.drop_cached()
    return store


def flush_until_ok(store, attempts: int = 5) -> None:
    """flush() after a fault cleared: a batch that failed before the clear may still be reported once."""
    for _ in range(attempts - 1):
        try:
            return store.flush()
        except StoreIOError:
            continue
    store.flush()


# ---------------------------------------------------------------------------- corruption on disk
@pytest.mark.parametrize("where", ["header", "payload", "tail"])
def test_corrupt_byte_in_data_file_is_a_miss_forever(store_config, engine_kind, caplog, where):
    cfg = store_config(io_engine=engine_kind)
    values = values_for(["left", "victim", "right"], n=3000)  # 12000 bytes: 2 full pages and a tail
    fill(cfg, values)
    offset = find_record(data_file(cfg), "victim")
    assert offset is not None
    at = {"header": 40, "payload": HEADER_BYTES + 5000, "tail": HEADER_BYTES + 11000}[where]
    flip_byte(data_file(cfg), offset + at)
    assert len(scan_root(cfg.root).problems) == 1  # the offline scan sees it too

    caplog.set_level(logging.ERROR, logger="hstore")
    with TieredStore(cfg) as store:
        assert "victim" in store  # not known until read
        assert store.get("victim") is None
        st = store.stats()
        assert st["corrupt_chunks"] == 1 and st["io_errors"] == 0
        assert "victim" not in store and len(store) == 2
        assert any("corrupt" in r.getMessage() and "victim" in r.getMessage() for r in caplog.records)
        assert_same(store.get("left"), values["left"])
        assert_same(store.get("right"), values["right"])
        assert store.get("victim") is None
        assert store.stats()["corrupt_chunks"] == 1  # a miss now, not a second corrupt read
    report = scan_root(cfg.root)
    assert report.entries == 2 and report.problems == []
    with TieredStore(cfg) as store:
        assert "victim" not in store and store.get("victim") is None
        assert sorted(store.keys()) == [b"left", b"right"]
        store.put("victim", values["victim"])  # the key (and its space) can be used again
        store.flush()
        store.drop_cached()
        assert_same(store.get("victim"), values["victim"])


def test_corrupt_chunk_in_a_batch_read_fails_only_that_key(store_config, engine_kind):
    cfg = store_config(io_engine=engine_kind)
    values = values_for([f"k{i}" for i in range(6)], n=2000)
    fill(cfg, values)
    flip_byte(data_file(cfg), find_record(data_file(cfg), "k3") + HEADER_BYTES + 7)
    with TieredStore(cfg) as store:
        got = store.get_many(list(values))
        for (k, v), g in zip(values.items(), got):
            if k == "k3":
                assert g is None
            else:
                assert_same(g, v)
        outs = [torch.empty(2000) for _ in values]
        assert store.get_many_into(list(values), outs) == [k != "k3" for k in values]
        assert store.stats()["corrupt_chunks"] == 1


def test_record_of_another_key_is_not_served(store_config, engine_kind):
    # An index entry that points at a valid record of a different key (e.g. after a
    # bug or a torn update) must be a miss, not the other key's data.
    cfg = store_config(io_engine=engine_kind)
    fill(cfg, {"a": torch.ones(100), "b": torch.zeros(100)})
    with edited_index(cfg) as idx:
        a, b = idx.get(b"a"), idx.get(b"b")
        swapped = IndexEntry(b"b", a.device, a.offset, a.length, a.nbytes, b.dtype, b.shape, a.checksum, b.created)
        idx.put_many([swapped])
        idx.delete_many([b"a"])
    with TieredStore(cfg) as store:
        assert store.get("b") is None
        assert store.stats()["corrupt_chunks"] == 1


def test_index_entries_outside_the_files_or_overlapping_are_dropped_at_open(store_config, caplog):
    cfg = store_config()
    fill(cfg, {"good": torch.ones(100), "twin": torch.ones(100)})
    with edited_index(cfg) as idx:
        g, twin = idx.get(b"good"), idx.get(b"twin")
        idx.put_many([
            IndexEntry(b"outside", 0, 1 << 40, g.length, g.nbytes, g.dtype, g.shape, g.checksum, 0.0),
            IndexEntry(b"bad-device", 7, 0, g.length, g.nbytes, g.dtype, g.shape, g.checksum, 0.0),
            IndexEntry(b"bad-length", 0, twin.offset, 3, g.nbytes, g.dtype, g.shape, g.checksum, 0.0),
            IndexEntry(b"overlap", 0, g.offset, g.length, g.nbytes, g.dtype, g.shape, g.checksum, 0.0),
        ])
    caplog.set_level(logging.WARNING, logger="hstore")
    with TieredStore(cfg) as store:
        present = set(store.keys())
        assert b"outside" not in present and b"bad-device" not in present and b"bad-length" not in present
        assert b"twin" in present
        # of two entries claiming the same extent, at most one is kept, and what is served is right
        assert len(present & {b"good", b"overlap"}) == 1
        for k in present:
            got = store.get(k)
            assert got is None or torch.equal(got, torch.ones(100))
    assert any("dropping" in r.getMessage() for r in caplog.records)
    assert scan_root(cfg.root).problems == []


def test_index_entry_whose_shape_does_not_match_its_size_is_dropped_at_open(store_config):
    cfg = store_config()
    fill(cfg, {"k": torch.ones(100), "other": torch.zeros(3)})
    with edited_index(cfg) as idx:
        e = idx.get(b"k")
        idx.put_many([IndexEntry(b"k", e.device, e.offset, e.length, e.nbytes, e.dtype, (7,), e.checksum, e.created)])
    with TieredStore(cfg) as store:
        assert store.get("k") is None  # not a ValueError from a wrongly sized buffer
        assert_same(store.get("other"), torch.zeros(3))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_data_file_truncated_or_deleted_makes_misses_not_garbage(store_config, engine_kind, damage):
    cfg = store_config(io_engine=engine_kind)
    values = values_for([f"k{i}" for i in range(5)], n=3000)
    fill(cfg, values)
    path = data_file(cfg)
    if damage == "truncate":
        os.truncate(path, find_record(path, "k2"))  # k2 and what lies after it are gone
    else:
        path.unlink()
    with TieredStore(cfg) as store:
        got = store.get_many(list(values))
        survivors = [k for k, g in zip(values, got) if g is not None]
        for k in survivors:
            assert_same(store.get(k), values[k])
        assert store.stats()["corrupt_chunks"] == len(values) - len(survivors) > 0
        assert sorted(store.keys()) == sorted(k.encode() for k in survivors)
    assert scan_root(cfg.root).problems == []


# ---------------------------------------------------------------------------- read faults
def test_eio_on_read_is_a_counted_miss(open_store, store_config, faulty_engine, caplog):
    cfg = store_config(io_engine=faulty_engine)
    values = values_for(["a", "b"], n=5000)
    store = cold_store(open_store, cfg, values)
    caplog.set_level(logging.ERROR, logger="hstore")
    rule = faulty_engine.fail(errno.EIO, write=False, times=1)
    assert store.get("a") is None
    assert rule.fired == 1
    st = store.stats()
    assert st["io_errors"] == 1 and st["corrupt_chunks"] == 0 and st["misses"] == 1
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert any("Input/output error" in r.getMessage() for r in caplog.records)
    assert_same(store.get("b"), values["b"])
    assert "a" not in store  # dropped: the index no longer points at it
    store.close()
    with TieredStore(store_config(io_engine=faulty_engine)) as again:
        assert again.keys() == [b"b"]


def test_eio_on_one_device_fails_only_the_records_there(open_store, store_config, faulty_engine, tmp_path):
    cfg = store_config(io_engine=faulty_engine, nvme_dirs=[tmp_path / "ssd0", tmp_path / "ssd1"])
    values = values_for([f"k{i}" for i in range(8)], n=1500)
    store = cold_store(open_store, cfg, values)
    faulty_engine.fail(errno.EIO, write=False, fd=data_file_fd(tmp_path / "ssd1"))
    got = store.get_many(list(values))  # one batch over both devices
    ok = {k for k, g in zip(values, got) if g is not None}
    for k in ok:
        assert_same(store.get(k), values[k])
    assert 0 < len(ok) < len(values)
    assert store.stats()["io_errors"] == len(values) - len(ok)
    store.close()
    faulty_engine.clear()
    with TieredStore(cfg) as again:
        assert set(again.keys()) == {k.encode() for k in ok}


def test_short_read_is_a_counted_miss(open_store, store_config, faulty_engine):
    store = cold_store(open_store, store_config(io_engine=faulty_engine), {"a": torch.arange(5000.0)})
    faulty_engine.short(keep=4096, write=False, times=1)
    out = torch.full((5000,), -1.0)
    assert not store.get_into("a", out)
    assert store.stats()["io_errors"] == 1
    assert store.get("a") is None
    store.close()


def test_bit_flipped_in_transit_on_read_is_caught_by_the_checksum(open_store, store_config, faulty_engine):
    values = {"a": torch.arange(5000.0), "b": torch.arange(10.0)}
    store = cold_store(open_store, store_config(io_engine=faulty_engine), values)
    faulty_engine.flip(at=HEADER_BYTES + 100, write=False, times=1)
    assert store.get("a") is None
    assert store.stats()["corrupt_chunks"] == 1
    assert_same(store.get("b"), torch.arange(10.0))
    store.close()


def test_bit_flipped_on_the_way_to_disk_is_caught_on_read(open_store, store_config, faulty_engine):
    store = open_store(store_config(io_engine=faulty_engine))
    value = torch.arange(5000.0)
    faulty_engine.flip(at=HEADER_BYTES + 100, write=True, times=1)
    store.put("a", value)
    store.flush()  # silent corruption: the write "succeeds"
    assert_same(store.get("a"), value)  # from DRAM, whose copy is intact
    store.drop_cached()
    assert store.get("a") is None
    assert store.stats()["corrupt_chunks"] == 1
    store.close()


# ---------------------------------------------------------------------------- write faults
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_write_error_fails_flush_keeps_dram_copy_and_recovers(open_store, store_config, faulty_engine, code):
    cfg = store_config(io_engine=faulty_engine)
    before = values_for(["old0", "old1"], n=2000)
    store = open_store(cfg)
    for k, v in before.items():
        store.put(k, v)
    store.flush()
    rule = faulty_engine.fail(code, write=True)
    new = keyed_tensor("new", 1)
    store.put("new", new)
    with pytest.raises(StoreIOError) as exc:
        store.flush()
    assert exc.value.errno == code and os.strerror(code) in str(exc.value)
    assert rule.fired >= 1
    st = store.stats()
    assert st["flush_failures"] >= 1 and st["dirty_items"] == 1
    assert store.locate(["new"]) == ["dram"]
    assert_same(store.get("new"), new)  # still readable from DRAM
    store.drop_cached()  # must not drop the only copy
    assert_same(store.get("new"), new)
    report_keys = _index_keys_in_subprocess(cfg.root)
    assert b"new" not in report_keys and {b"old0", b"old1"} <= report_keys

    faulty_engine.clear()  # the device recovers: the flusher's retry succeeds
    flush_until_ok(store)
    assert store.stats()["dirty_items"] == 0
    store.close()
    report = scan_root(cfg.root)
    assert report.problems == [] and report.keys == {b"old0", b"old1", b"new"}
    with TieredStore(store_config(io_engine=faulty_engine)) as again:
        assert_same(again.get("new"), new)
        for k, v in before.items():
            assert_same(again.get(k), v)


def test_write_error_until_close_loses_only_the_unflushed_items(open_store, store_config, faulty_engine):
    cfg = store_config(io_engine=faulty_engine)
    store = open_store(cfg)
    store.put("kept", torch.ones(1000))
    store.flush()
    faulty_engine.fail(errno.EIO, write=True)
    store.put("lost", torch.zeros(1000))
    store.put("kept", torch.full((10,), 2.0))  # an overwrite that never reaches the disk
    store.close()  # best effort: the flusher gives up, the index is untouched
    report = scan_root(cfg.root)
    assert report.problems == [] and report.keys == {b"kept"}
    faulty_engine.clear()
    with TieredStore(store_config(io_engine=faulty_engine)) as again:
        assert again.keys() == [b"kept"]
        assert_same(again.get("kept"), torch.ones(1000))  # the last durable value, exactly


def test_failure_of_one_op_fails_the_whole_batch(open_store, store_config, faulty_engine):
    cfg = store_config(io_engine=faulty_engine, nvme_dirs=[Path(store_config().root) / f"d{i}" for i in range(2)])
    store = open_store(cfg)
    faulty_engine.fail(errno.EIO, write=True, nth=1, times=1)  # the second op of the first batch
    values = values_for([f"k{i}" for i in range(6)], n=1000)
    for k, v in values.items():
        store.put(k, v)
    flush_until_ok(store)
    store.close()
    report = scan_root(cfg.root)
    assert report.problems == [] and report.keys == {k.encode() for k in values}
    with TieredStore(cfg) as again:
        for k, v in values.items():
            assert_same(again.get(k), v)


def test_short_write_fails_flush_then_recovers(open_store, store_config, faulty_engine):
    cfg = store_config(io_engine=faulty_engine)
    store = open_store(cfg)
    # Every write is short (header written, payload not) until flush() has seen one fail: a
    # one-shot fault could fail and be retried by the background flusher before flush() is called.
    faulty_engine.short(keep=4096, write=True)
    store.put("a", torch.arange(5000.0))
    with pytest.raises(StoreIOError, match="short write"):
        store.flush()
    faulty_engine.clear()
    flush_until_ok(store)
    store.close()
    assert scan_root(cfg.root).problems == []
    with TieredStore(cfg) as again:
        assert_same(again.get("a"), torch.arange(5000.0))


def test_fsync_failure_fails_flush_and_the_data_is_rewritten(open_store, store_config, faulty_engine):
    cfg = store_config(io_engine=faulty_engine)
    store = open_store(cfg)
    faulty_engine.fail_fsync(errno.EIO)
    store.put("a", torch.arange(3000.0))
    with pytest.raises(StoreIOError, match="fsync"):
        store.flush()
    assert _index_keys_in_subprocess(cfg.root) == set()  # not indexed: its durability is unknown
    assert_same(store.get("a"), torch.arange(3000.0))
    faulty_engine.clear()
    flush_until_ok(store)
    store.close()
    report = scan_root(cfg.root)
    assert report.problems == [] and report.keys == {b"a"}
    with TieredStore(cfg) as again:
        assert_same(again.get("a"), torch.arange(3000.0))


def test_puts_fail_clearly_when_dram_is_full_of_unflushable_data(open_store, store_config, faulty_engine):
    store = open_store(store_config(io_engine=faulty_engine, dram_bytes=256 * KiB))
    faulty_engine.fail(errno.EIO, write=True)
    with pytest.raises(StoreIOError, match="flusher is failing"):
        for i in range(100):
            store.put(f"k{i}", torch.ones(8 * KiB))  # 32 KiB each
    faulty_engine.clear()
    flush_until_ok(store)
    store.put("after", torch.ones(8 * KiB))
    assert_same(store.get("after"), torch.ones(8 * KiB))
    assert_same(store.get("k0"), torch.ones(8 * KiB))
    store.close()


# ---------------------------------------------------------------------------- a full disk
def test_full_nvme_tier_evicts_old_items_and_never_corrupts(store_config, engine_kind):
    cfg = store_config(io_engine=engine_kind, dram_bytes=256 * KiB, nvme_bytes=1 * MiB)
    with TieredStore(cfg) as store:
        for i in range(120):  # ~2.6 MiB through a 1 MiB tier
            store.put(f"k{i}", keyed_tensor(f"k{i}", i))
            if i % 10 == 9:
                store.flush()
        st = store.stats()
        assert st["tiers"]["nvme"]["evictions"] > 0 and st["flush_failures"] == 0
        assert "k119" in store
        for k in store.keys():
            got = store.get(k)
            assert_same(got, keyed_tensor(k, int(k[1:])))
        assert store.stats()["corrupt_chunks"] == 0
    report = scan_root(cfg.root)
    assert report.problems == [] and 0 < report.entries < 120
    with TieredStore(cfg) as again:
        assert set(again.keys()) == report.keys
        for k in again.keys():
            assert_same(again.get(k), keyed_tensor(k, int(k[1:])))


def test_nvme_bytes_beyond_free_space_fails_at_open_and_leaves_nothing_behind(store_config, tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    cfg = store_config(nvme_bytes=4 * free + (1 << 30))
    with pytest.raises(StoreIOError, match="cannot reserve") as exc:
        TieredStore(cfg)
    assert exc.value.errno == errno.ENOSPC
    assert "free" in str(exc.value)
    leftover = data_file(cfg)
    assert not leftover.exists() or leftover.stat().st_blocks * 512 < 64 * MiB
    with TieredStore(store_config()) as store:  # the root is usable (and unlocked) with a sane size
        store.put("k", torch.ones(4))
        store.flush()


def test_bad_nvme_directory_is_a_clear_error(store_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreConfigError, match="cannot use"):
        TieredStore(store_config(nvme_dirs=[blocker / "sub"]))
    with TieredStore(store_config()) as store:  # no lock left behind
        store.put("k", torch.ones(1))


def _index_keys_in_subprocess(root) -> set[bytes]:
    """Keys the on-disk index holds right now (read from another process: the store is open here)."""
    from tests.helpers.store import scan_root_elsewhere

    report = scan_root_elsewhere(root)
    assert report.problems == []
    return report.keys

"""A store as it lies on disk: summarise it without opening it, verify it, rebuild its index.

The CLI's `stats` must work while a serving process holds the store, so it
reads the LMDB index read-only and never takes the writer lock. `verify` must
read every record, so it opens the store (taking the lock) with the layout the
store was made with: `existing_config` recovers that layout from the index's
"layout" record and the sizes of the data files, so nobody has to remember the
nvme_dirs and nvme_bytes a store was created with.

Nothing here prints: the CLI formats what these functions return.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lmdb

from hstore.config import StoreConfig
from hstore.errors import StoreConfigError, StoreIOError
from hstore.format import INDEX_DIR, LAYOUT_META_KEY, data_file, default_nvme_dir, index_data_file, index_path, lock_path
from hstore.index import Index, IndexEntry
from hstore.opening import RootLock, read_layout_file
from hstore.recovery import RecoveryReport, move_aside
from hstore.tiers.base import ReadStatus

_MiB = 1 << 20


class NotAStoreError(StoreConfigError):
    """The path given is not an hstore root (missing, not a directory, or no index there)."""


# ---------------------------------------------------------------------------- the root on disk
def require_store_root(root: str | os.PathLike) -> Path:
    """`root` as a Path; NotAStoreError when it is not an hstore root (so nothing creates one by accident)."""
    path = Path(root)
    if not path.exists():
        raise NotAStoreError(f"{path}: no such directory")
    if not path.is_dir():
        raise NotAStoreError(f"{path} is not a directory")
    if not index_data_file(path).is_file():
        raise NotAStoreError(f"{path} is not an hstore store (no {INDEX_DIR}/data.mdb)")
    return path


def open_index_readonly(root: str | os.PathLike) -> Index:
    """The store's index, read-only and without LMDB's reader lock (no writer lock either).

    While a process holds the store, only the index's meta pages are checked before it is
    mapped (its other pages change under a walk); otherwise the whole file is.
    """
    path = require_store_root(root)
    return Index(index_path(path), readonly=True, deep_check=lock_holder(path) is None)


def read_layout(index: Index) -> list[Path]:
    """The NVMe directories recorded in the index (empty for a store without an NVMe tier)."""
    raw = index.meta_get(LAYOUT_META_KEY)
    if raw is None:
        return []
    try:
        layout = json.loads(raw)
        return [Path(d) for d in layout["nvme_dirs"]]
    except (ValueError, KeyError, TypeError) as e:
        raise StoreConfigError(f"the index's layout record is unreadable: {e}") from e


def lock_holder(root: str | os.PathLike) -> int | None:
    """Pid of the process holding the store's writer lock, or None (Linux: read from /proc/locks).

    Reading /proc/locks takes no lock itself, so this never gets in a writer's way.
    """
    try:
        st = os.stat(lock_path(root))
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:56789 0 EOF"; blocked waiters have a "->" field
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        dev_ino = parts[5]
        major, minor, ino = dev_ino.split(":")
        if f"{int(major, 16):02x}:{int(minor, 16):02x}:{ino}" == wanted:
            try:
                return int(parts[4])
            except ValueError:
                return None
    return None


def existing_config(root: str | os.PathLike, **overrides) -> StoreConfig:
    """A StoreConfig that opens the store at `root` as it was made: its NVMe directories and size.

    Per-device size is the size of the data file in each directory (an NVMe
    tier never shrinks, and a larger size would grow the files), so
    nvme_bytes = that size times the number of directories. DRAM gets a small
    unpinned arena and the GPU tier is off: tools that open a store to scan
    it need neither. `overrides` replace any field.
    """
    with closing(open_index_readonly(root)) as index:
        dirs = read_layout(index)
        has_items = len(index) > 0
    sizes = []
    for d in dirs:
        f = data_file(d)
        try:
            sizes.append(f.stat().st_size)
        except FileNotFoundError:
            if has_items:
                raise StoreConfigError(
                    f"the data file {f} is missing; opening the store would create an empty one"
                ) from None
            sizes.append(0)
    fields: dict = dict(root=Path(root), dram_bytes=64 * _MiB, gpu_bytes=0, pin_dram=False)
    per_device = max(sizes, default=0)
    if dirs and per_device > 0:
        fields.update(nvme_dirs=dirs, nvme_bytes=per_device * len(dirs))
    else:
        fields.update(nvme_bytes=0)
    fields.update(overrides)
    return StoreConfig(**fields)


def display_key(key: bytes, limit: int = 60) -> str:
    """A key for humans: UTF-8 where it decodes, escapes elsewhere, shortened to `limit` characters."""
    text = key.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


# ---------------------------------------------------------------------------- stats
def summarize(root: str | os.PathLike) -> dict:
    """What the store at `root` holds, read from its index without taking the writer lock.

    JSON-ready: item and byte counts (payload bytes as put, stored bytes with
    headers and padding), per NVMe data file (size, bytes stored, free space in
    the file and on its filesystem), a dtype histogram, the oldest and newest
    item, and whether a process holds the store open.
    """
    root = require_store_root(root)
    try:
        return _summarize(root)
    except lmdb.Error as e:  # read without LMDB's reader lock: a busy writer can recycle pages under us
        raise StoreIOError(f"the index at {index_path(root)} changed while it was read ({e}); try again") from e


def _summarize(root: Path) -> dict:
    with closing(open_index_readonly(root)) as index:
        dirs = read_layout(index)
        records = len(index)
        items = payload = stored = hits = 0
        smallest: int | None = None
        largest = 0
        per_dev: dict[int, Counter] = {}
        dtypes: dict[str, Counter] = {}
        oldest: IndexEntry | None = None
        newest: IndexEntry | None = None
        last_access = 0.0
        for e in index.items():
            items += 1
            payload += e.nbytes
            stored += e.length
            hits += e.hits
            smallest = e.nbytes if smallest is None else min(smallest, e.nbytes)
            largest = max(largest, e.nbytes)
            dev = per_dev.setdefault(e.device, Counter())
            dev["items"] += 1
            dev["payload_bytes"] += e.nbytes
            dev["stored_bytes"] += e.length
            dt = dtypes.setdefault(str(e.dtype).removeprefix("torch."), Counter())
            dt["items"] += 1
            dt["bytes"] += e.nbytes
            if oldest is None or e.created < oldest.created:
                oldest = e
            if newest is None or e.created > newest.created:
                newest = e
            last_access = max(last_access, e.atime)
    devices = []
    for i, d in enumerate(dirs):
        f = data_file(d)
        counts = per_dev.pop(i, Counter())
        info: dict = {
            "device": i,
            "dir": str(d),
            "file": str(f),
            "items": counts["items"],
            "payload_bytes": counts["payload_bytes"],
            "stored_bytes": counts["stored_bytes"],
        }
        try:
            st = f.stat()
            info.update(exists=True, file_bytes=st.st_size, allocated_bytes=st.st_blocks * 512,
                        free_in_file_bytes=max(0, st.st_size - counts["stored_bytes"]))
        except FileNotFoundError:
            info.update(exists=False, file_bytes=0, allocated_bytes=0, free_in_file_bytes=0)
        try:
            usage = shutil.disk_usage(d)
            info.update(fs_total_bytes=usage.total, fs_free_bytes=usage.free)
        except OSError:
            info.update(fs_total_bytes=None, fs_free_bytes=None)
        devices.append(info)
    index_file = index_data_file(root)
    holder = lock_holder(root)

    def item(e: IndexEntry | None) -> dict | None:
        if e is None:
            return None
        return {"key": display_key(e.key), "created": e.created, "created_iso": _iso(e.created),
                "nbytes": e.nbytes, "dtype": str(e.dtype).removeprefix("torch."), "shape": list(e.shape)}

    return {
        "root": str(root.resolve()),
        "in_use": holder is not None,
        "in_use_by_pid": holder,
        "index_records": records,
        "items": items,
        "undecodable_records": records - items,
        "payload_bytes": payload,
        "stored_bytes": stored,
        "smallest_item_bytes": smallest,
        "largest_item_bytes": largest if items else None,
        "total_hits": hits,
        "index_file_bytes": index_file.stat().st_size,
        "nvme_dirs": [str(d) for d in dirs],
        "devices": devices,
        # records that name a device the layout does not have (a damaged index)
        "orphan_items": sum(c["items"] for c in per_dev.values()),
        "dtypes": {k: dict(v) for k, v in sorted(dtypes.items(), key=lambda kv: -kv[1]["bytes"])},
        "oldest": item(oldest),
        "newest": item(newest),
        "last_access": last_access or None,
        "last_access_iso": _iso(last_access) if last_access else None,
    }


# ---------------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    """What a scan of every indexed record found."""

    items: int = 0
    ok: int = 0
    bytes_checked: int = 0
    corrupt: list[bytes] = field(default_factory=list)
    """Header, key or checksum mismatch."""
    unreadable: list[bytes] = field(default_factory=list)
    """The device failed the read or returned it short."""
    dropped_at_open: list[bytes] = field(default_factory=list)
    """Index entries the store refused when it opened (outside the data files, overlapping); it removes them itself."""
    repaired: int = 0
    seconds: float = 0.0

    @property
    def bad(self) -> int:
        return len(self.corrupt) + len(self.unreadable) + len(self.dropped_at_open)

    def as_dict(self) -> dict:
        return {
            "items": self.items, "ok": self.ok, "corrupt": len(self.corrupt), "unreadable": len(self.unreadable),
            "dropped_at_open": len(self.dropped_at_open), "repaired": self.repaired,
            "bytes_checked": self.bytes_checked, "seconds": round(self.seconds, 3),
            "corrupt_keys": [display_key(k, 200) for k in self.corrupt],
            "unreadable_keys": [display_key(k, 200) for k in self.unreadable],
            "dropped_at_open_keys": [display_key(k, 200) for k in self.dropped_at_open],
        }


def verify_store(
    root: str | os.PathLike,
    *,
    repair: bool = False,
    batch_bytes: int = 64 * _MiB,
    io_engine: str = "auto",
    queue_depth: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Read back every indexed record through the NVMe tier and check it.

    Takes the store's writer lock (StoreLockedError when another process has
    it open). Records are read in (device, offset) order, `batch_bytes` at a
    time, by the tier's `read_many`, which checks each record's header, key
    digest and payload checksum. `repair=True` deletes the bad entries.
    `progress(done_bytes, total_bytes)` is called as the scan advances.
    """
    from hstore.store import TieredStore  # heavy import, only for the commands that open a store

    root = require_store_root(root)
    start = time.perf_counter()
    with closing(open_index_readonly(root)) as index:
        before = {e.key for e in index.items()}
    cfg = existing_config(root, io_engine=io_engine, queue_depth=queue_depth, verify_reads=True)
    report = VerifyReport()
    with TieredStore(cfg) as store:
        entries = store.durable_entries()
        report.dropped_at_open = sorted(before - {e.key for e in entries})
        report.items = len(entries)
        total = sum(e.nbytes for e in entries)
        if progress is not None:
            progress(0, total)
        if entries and store.tier("nvme") is None:
            raise StoreConfigError(f"{root} indexes {len(entries)} items but has no NVMe tier")
        done = 0
        for n, (e, status) in enumerate(store.verify_durable(entries, batch_bytes), 1):
            if status == ReadStatus.OK:
                report.ok += 1
            elif status == ReadStatus.CORRUPT:
                report.corrupt.append(e.key)
            else:
                report.unreadable.append(e.key)
            done += e.nbytes
            report.bytes_checked = done
            if progress is not None and (n % 256 == 0 or n == len(entries)):
                progress(done, total)
        if repair:
            for key in report.corrupt + report.unreadable:
                report.repaired += bool(store.delete(key))
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------- recover
def recover_store(
    root: str | os.PathLike,
    *,
    nvme_dirs: list[str | os.PathLike] | None = None,
    io_engine: str = "auto",
) -> RecoveryReport:
    """Rebuild the index of the store at `root` from its data files' record headers.

    The old index folder (damaged, or merely distrusted) is moved aside, never deleted.
    The NVMe directories come from `nvme_dirs`, else the layout file beside the index,
    else the default ROOT/nvme. Takes the store's lock (StoreLockedError when it is open).
    """
    from hstore.store import TieredStore  # heavy import, only for the commands that open a store

    path = Path(root)
    if not path.is_dir():
        raise NotAStoreError(f"{path}: no such directory")
    dirs = [Path(d) for d in nvme_dirs] if nvme_dirs else read_layout_file(path) or [default_nvme_dir(path)]
    sizes = [data_file(d).stat().st_size for d in dirs if data_file(d).exists()]
    if len(sizes) != len(dirs) or not all(sizes):
        missing = [str(data_file(d)) for d in dirs if not data_file(d).exists()]
        raise NotAStoreError(f"{path}: no data files to recover from (missing: {', '.join(missing)}); "
                             "name the NVMe directories with --nvme-dir")
    lock = RootLock(path)
    try:
        moved = move_aside(index_path(path))
    finally:
        lock.release()
    cfg = StoreConfig(root=path, nvme_dirs=dirs, nvme_bytes=max(sizes) * len(dirs), dram_bytes=64 * _MiB,
                      gpu_bytes=0, pin_dram=False, io_engine=io_engine, recover_index=True)
    with TieredStore(cfg) as store:
        report = store.recovery
    report.moved_aside = str(moved) if moved else None
    return report

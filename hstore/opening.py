"""Opening a store's root: the writer lock, the layout, the index (or its rebuild), the durable entries.

Each step refuses with a clear error before anything is changed on disk: a root another
process holds (StoreLockedError), NVMe directories that differ from the ones the store was
made with (StoreConfigError), a damaged index, or a missing one while data files exist
(IndexCorruptError naming `hstore recover ROOT`, unless the config asks to rebuild it).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from pathlib import Path

from hstore.errors import IndexCorruptError, StoreConfigError, StoreIOError, StoreLockedError
from hstore.format import (
    LAYOUT_FORMAT,
    LAYOUT_META_KEY,
    data_file,
    index_data_file,
    index_path,
    layout_path,
    lock_path,
)
from hstore.index import Index
from hstore.recovery import RecoveryReport, move_aside
from hstore.tiers.base import DurableTier, Location

log = logging.getLogger(__name__)


class RootLock:
    """The exclusive flock on ROOT/LOCK, holding the owner's pid (for `hstore stats` and error messages)."""

    def __init__(self, root: Path):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreConfigError(f"cannot use {root} as the store root: {e.strerror or e}") from e
        self.fd = os.open(lock_path(root), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            os.close(self.fd)
            self.fd = -1
            raise StoreLockedError(f"the store at {root} is open in another process (pid {holder or '?'})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also releases the flock
            self.fd = -1


def read_layout_file(root: Path) -> list[Path] | None:
    """The NVMe directories recorded beside the index (None when the file is absent or unreadable)."""
    try:
        return [Path(d) for d in json.loads(layout_path(root).read_text())["nvme_dirs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_layout_file(root: Path, dirs: list[str]) -> None:
    tmp = layout_path(root).with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({"format": LAYOUT_FORMAT, "nvme_dirs": dirs}))
        os.replace(tmp, layout_path(root))
    except OSError as e:
        raise StoreIOError(f"cannot write {layout_path(root)}: {e.strerror or e}", e.errno or 0) from e


def open_index(root: Path, dirs: list[str], *, map_size: int, sync: bool, recover: bool) -> tuple[Index, RecoveryReport | None]:
    """The store's index, and a RecoveryReport when it must be rebuilt from the data files
    (only with `recover`; without it a damaged or missing index raises IndexCorruptError)."""
    have_data = any(data_file(d).exists() for d in dirs or [str(p) for p in read_layout_file(root) or []])
    report = None
    if have_data and not index_data_file(root).exists():
        if not recover:
            raise IndexCorruptError(
                f"the index of {root} is missing but its data files exist; rebuild it with `hstore recover {root}` "
                "(or open with StoreConfig(recover_index=True)), or remove the data files to start empty"
            )
        report = RecoveryReport()
    try:
        index = Index(index_path(root), map_size=map_size, sync=sync)
    except IndexCorruptError:
        if not recover:
            raise
        moved = move_aside(index_path(root))
        report = RecoveryReport(moved_aside=str(moved) if moved else None)
        index = Index(index_path(root), map_size=map_size, sync=sync)
    return index, report


def check_layout(index: Index, root: Path, dirs: list[str]) -> None:
    """Refuse NVMe directories other than the ones the store keeps its data in."""
    meta = index.meta_get(LAYOUT_META_KEY)
    if meta is None:
        return
    saved = json.loads(meta)
    if saved["nvme_dirs"] and dirs and saved["nvme_dirs"] != dirs:
        raise StoreConfigError(f"the store at {root} keeps its NVMe data in {saved['nvme_dirs']}, the config names {dirs}")
    if saved["nvme_dirs"] and not dirs and len(index):
        raise StoreConfigError(f"the store at {root} holds {len(index)} items on NVMe; open it with nvme_bytes > 0")


def record_layout(index: Index, root: Path, dirs: list[str]) -> None:
    """Write the NVMe directories to the index and beside it (the copy a lost index leaves behind)."""
    index.meta_put(LAYOUT_META_KEY, json.dumps({"format": LAYOUT_FORMAT, "nvme_dirs": dirs}).encode())
    _write_layout_file(root, dirs)


def durable_entries(index: Index, tier: DurableTier):
    """(IndexEntry, Location) of every index entry the durable tier can hold; the rest are removed."""
    loaded, bad = [], []
    for ie in index.items():
        loc = Location(tier.name, ie.device, ie.offset, ie.length, ie.nbytes, ie.checksum)
        consistent = ie.nbytes == math.prod(ie.shape) * ie.dtype.itemsize
        if not consistent or not tier.reserve(loc):
            bad.append(ie.key)
            continue
        loaded.append((ie, loc))
    if bad:
        log.warning("dropping %d index entries that are inconsistent, leave the NVMe files or overlap", len(bad))
        index.delete_many(bad)
    return loaded

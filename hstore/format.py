"""Every name a store gives to things on disk, in one place.

The store, `hstore stats|verify|recover` and the tests all find a store's files through
these, so a renamed file cannot leave one of them looking in the old place.

    ROOT/LOCK                 writer lock (flock) holding the pid of the process that has it open
    ROOT/layout.json          the NVMe directories, also kept outside LMDB so a lost index can be rebuilt
    ROOT/index/data.mdb       the LMDB index (entries: key -> durable location; meta: "layout")
    DIR/hstore.dat            one preallocated data file per NVMe directory (default DIR: ROOT/nvme)

A data file is a sequence of records: a RECORD_HEADER_BYTES header (see `hstore.record`),
then the payload padded to 4 KiB.
"""
from __future__ import annotations

import os
from pathlib import Path

LOCK_FILE = "LOCK"
LAYOUT_FILE = "layout.json"
INDEX_DIR = "index"
INDEX_DATA_FILE = "data.mdb"
LAYOUT_META_KEY = "layout"
"""The index's meta record holding {"format": 1, "nvme_dirs": [...]}."""
LAYOUT_FORMAT = 1
DEFAULT_NVME_DIR = "nvme"
DATA_FILE = "hstore.dat"

RECORD_HEADER_BYTES = 4096
RECORD_MAGIC_V1 = b"HSTORE\x00\x01"
"""Version 1 headers carry a 16-byte digest of the key (written before format 2)."""
RECORD_MAGIC_V2 = b"HSTORE\x00\x02"
"""Version 2 headers carry the key itself when it fits, and a write sequence number."""
RECORD_MAGICS = (RECORD_MAGIC_V1, RECORD_MAGIC_V2)


def lock_path(root: str | os.PathLike) -> Path:
    return Path(root) / LOCK_FILE


def layout_path(root: str | os.PathLike) -> Path:
    return Path(root) / LAYOUT_FILE


def index_path(root: str | os.PathLike) -> Path:
    return Path(root) / INDEX_DIR


def index_data_file(root: str | os.PathLike) -> Path:
    return index_path(root) / INDEX_DATA_FILE


def default_nvme_dir(root: str | os.PathLike) -> Path:
    return Path(root) / DEFAULT_NVME_DIR


def data_file(directory: str | os.PathLike) -> Path:
    return Path(directory) / DATA_FILE

"""The durable index: LMDB maps each key to where its bytes live on a persistent tier.

Only data that is already durable is ever written here (the store fsyncs the
data first), and every mutation is one short write transaction (py-lmdb's
habit). Volatile tiers (DRAM, GPU) are not indexed: after a restart they are
empty, so an index entry for them could only point at garbage.
"""
from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import lmdb
import torch

from hstore.errors import IndexCorruptError, StoreConfigError, StoreIOError
from hstore.format import INDEX_DATA_FILE
from hstore.lmdbcheck import check_lmdb_file
from hstore.record import CODE_TO_DTYPE, dtype_code

_MAX_RAW_KEY = 400  # LMDB keys are limited to 511 bytes; longer keys are indexed by digest.
# format, device, offset, length, nbytes, dtype, ndim, checksum, created, atime, hits, keylen
_VALUE = struct.Struct("<BHQQQHBQddQI")
_FORMAT = 1


def index_key(key: bytes) -> bytes:
    """The LMDB key for a store key of any length."""
    if len(key) <= _MAX_RAW_KEY:
        return b"k" + key
    return b"h" + hashlib.blake2b(key, digest_size=32).digest()


@dataclass(slots=True)
class IndexEntry:
    """Where one item lives on a persistent tier, and what it must look like when read."""

    key: bytes
    device: int
    offset: int
    length: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    checksum: int
    created: float
    atime: float = 0.0
    hits: int = 0

    def encode(self) -> bytes:
        head = _VALUE.pack(
            _FORMAT, self.device, self.offset, self.length, self.nbytes, dtype_code(self.dtype),
            len(self.shape), self.checksum, self.created, self.atime, self.hits, len(self.key),
        )
        return head + struct.pack(f"<{len(self.shape)}Q", *self.shape) + self.key

    @classmethod
    def decode(cls, raw: bytes) -> "IndexEntry":
        (fmt, device, offset, length, nbytes, code, ndim, csum, created, atime, hits, keylen) = _VALUE.unpack_from(raw, 0)
        if fmt != _FORMAT or code not in CODE_TO_DTYPE:
            raise ValueError("unknown index record format")
        pos = _VALUE.size
        shape = struct.unpack_from(f"<{ndim}Q", raw, pos)
        pos += 8 * ndim
        key = bytes(raw[pos : pos + keylen])
        return cls(key, device, offset, length, nbytes, CODE_TO_DTYPE[code], tuple(shape), csum, created, atime, hits)


# LMDB errors that mean the file's content is wrong (not a permission or a resource problem).
_DAMAGE = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.VersionMismatchError,
           lmdb.IncompatibleError, lmdb.BadChecksumError, lmdb.PanicError)


def damaged(path: Path, why: object) -> IndexCorruptError:
    """The error for a damaged index at `path` (ROOT/index): what is wrong, and the command that rebuilds it."""
    root = path.parent
    return IndexCorruptError(
        f"the index at {path} is damaged ({why}); rebuild it from the data files with "
        f"`hstore recover {root}` (or open with StoreConfig(recover_index=True))"
    )


class Index:
    """Key -> IndexEntry in LMDB, plus a small table of store metadata.

    The LMDB file is checked before LMDB maps it (`hstore.lmdbcheck`): a truncated or
    mangled file would otherwise crash the process (SIGBUS) instead of raising. Any LMDB
    error while reading is an IndexCorruptError naming `hstore recover`.
    """

    def __init__(self, path: Path, *, map_size: int = 1 << 30, sync: bool = True, readonly: bool = False,
                 deep_check: bool = True):
        self.path = path
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
        problem = check_lmdb_file(path / INDEX_DATA_FILE, deep=deep_check)
        if problem is not None:
            raise damaged(path, problem)
        try:
            self._env = lmdb.open(
                str(path), map_size=map_size, max_dbs=2, sync=sync, metasync=sync,
                readonly=readonly, lock=not readonly, subdir=True,
            )
        except _DAMAGE as e:
            raise damaged(path, e) from e
        except lmdb.Error as e:
            raise StoreConfigError(f"cannot open the index at {path}: {e}") from e
        try:
            self._entries = self._env.open_db(b"entries", create=not readonly)
            self._meta = self._env.open_db(b"meta", create=not readonly)
        except lmdb.Error as e:
            self._env.close()
            raise damaged(path, e) from e
        self._grow_lock = threading.Lock()

    # -- entries -------------------------------------------------------------
    def get(self, key: bytes) -> IndexEntry | None:
        try:
            with self._env.begin(db=self._entries) as txn:
                raw = txn.get(index_key(key))
        except lmdb.Error as e:
            raise damaged(self.path, e) from e
        return IndexEntry.decode(raw) if raw is not None else None

    def put_many(self, entries: Iterable[IndexEntry]) -> None:
        items = [(index_key(e.key), e.encode()) for e in entries]
        if items:
            self._write(lambda txn: [txn.put(k, v, db=self._entries) for k, v in items])

    def delete_many(self, keys: Iterable[bytes]) -> None:
        ikeys = [index_key(k) for k in keys]
        if ikeys:
            self._write(lambda txn: [txn.delete(k, db=self._entries) for k in ikeys])

    def items(self) -> Iterator[IndexEntry]:
        """Every entry (a consistent snapshot), decoded; undecodable records are skipped."""
        try:
            with self._env.begin(db=self._entries) as txn:
                for _k, raw in txn.cursor():
                    try:
                        yield IndexEntry.decode(raw)
                    except (ValueError, struct.error):
                        continue
        except lmdb.Error as e:
            raise damaged(self.path, e) from e

    def __len__(self) -> int:
        try:
            with self._env.begin(db=self._entries) as txn:
                return txn.stat(self._entries)["entries"]
        except lmdb.Error as e:
            raise damaged(self.path, e) from e

    # -- metadata ------------------------------------------------------------
    def meta_get(self, name: str) -> bytes | None:
        try:
            with self._env.begin(db=self._meta) as txn:
                return txn.get(name.encode())
        except lmdb.Error as e:
            raise damaged(self.path, e) from e

    def meta_put(self, name: str, value: bytes) -> None:
        self._write(lambda txn: txn.put(name.encode(), value, db=self._meta))

    # -- plumbing ------------------------------------------------------------
    def _write(self, fn) -> None:
        """One write transaction; the map grows (doubles) when full."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                with self._grow_lock:
                    self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as e:
                raise StoreIOError(f"index write failed: {e}") from e

    def sync(self) -> None:
        self._env.sync(True)

    def close(self) -> None:
        self._env.close()

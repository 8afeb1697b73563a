"""A structural check of an LMDB file, run before LMDB maps it.

LMDB trusts its file: a truncated file, or a page number pointing past its end, makes
the process die of SIGBUS or SIGSEGV inside the C library, where no exception can be
raised. So before the index is opened, this walks the file's B-trees the way LMDB
would (meta pages, then every branch and leaf page reachable from the roots of the
free list, the main table and its named tables) and checks every page number, page
header, node offset and node size against the file. Pure reading with `struct` and
numpy; about one pass over the file.

Layout (lmdb.h / mdb.c, 64-bit builds, which is what py-lmdb ships): a page starts with
a 16-byte header (pgno u64, pad u16, flags u16, lower u16, upper u16 or overflow count
u32); meta pages 0 and 1 hold, after that header, magic u32, version u32, address u64,
mapsize u64, two 48-byte MDB_db records (free list, main), last_pg u64, txnid u64; the
page size is kept in the free list record's first word.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = 0xBEEFC0DE
PAGE_HEADER = 16
NODE_HEADER = 8
P_BRANCH, P_LEAF, P_OVERFLOW, P_LEAF2, P_SUBP = 0x01, 0x02, 0x04, 0x20, 0x40
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
P_INVALID = (1 << 64) - 1
_DB = struct.Struct("<IHHQQQQQ")  # pad(=psize for the free db), flags, depth, branch, leaf, overflow, entries, root
_META = struct.Struct("<IIQQ")


class _Damage(Exception):
    pass


def check_lmdb_file(path: Path, *, deep: bool = True) -> str | None:
    """None when the LMDB file at `path` is structurally sound (or absent: LMDB makes a new one),
    else what is wrong with it. `deep=False` checks only the meta pages and the file's length
    (for a file another process may be writing: its pages change under a walk)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return None
    try:
        with open(path, "rb", buffering=0) as f:
            _Walker(f.fileno(), size).run(deep)
    except _Damage as e:
        return str(e)
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    return None


class _Walker:
    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self.psize = 0
        self.npages = 0
        self.seen: set[int] = set()

    def run(self, deep: bool) -> None:
        if self.size == 0:
            return  # created and not yet initialised: LMDB writes the meta pages itself
        metas = [m for m in (self._meta(0), self._meta(1)) if m is not None]
        if not metas:
            raise _Damage("no valid meta page (not an LMDB file, or its first pages are overwritten)")
        psize, last_pg, txnid, dbs = max(metas, key=lambda m: m[2])
        self.psize, self.npages = psize, last_pg + 1
        if self.npages * psize > self.size:
            raise _Damage(f"the file is truncated: {self.size} bytes, its meta page needs {self.npages * psize}")
        if deep:
            free, main = dbs
            self._tree(*free, named=False)
            self._tree(*main, named=True)

    def _read(self, offset: int, n: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise _Damage(f"short read at offset {offset}")
        return data

    def _meta(self, index: int) -> tuple[int, int, int, list[tuple[int, int]]] | None:
        """(page size, last page, txnid, [(root, depth) of free, main]) of meta page `index`, or None."""
        for psize in (4096, 8192, 16384, 32768, 65536) if index else (4096,):
            offset = index * psize
            if offset + PAGE_HEADER + _META.size + 2 * _DB.size + 16 > self.size:
                return None
            head = self._read(offset, PAGE_HEADER + _META.size + 2 * _DB.size + 16)
            magic, _version, _addr, _mapsize = _META.unpack_from(head, PAGE_HEADER)
            free = _DB.unpack_from(head, PAGE_HEADER + _META.size)
            stored_psize = free[0]
            if magic != MAGIC or stored_psize not in (4096, 8192, 16384, 32768, 65536):
                continue
            if index and stored_psize != psize:
                continue
            main = _DB.unpack_from(head, PAGE_HEADER + _META.size + _DB.size)
            last_pg, txnid = struct.unpack_from("<QQ", head, PAGE_HEADER + _META.size + 2 * _DB.size)
            return stored_psize, last_pg, txnid, [(free[7], free[2]), (main[7], main[2])]
        return None

    def _tree(self, root: int, depth: int, *, named: bool) -> None:
        """Walk the B-tree at `root`; with `named`, its leaves may hold the roots of named tables."""
        if root == P_INVALID:
            return
        if depth > 64:
            raise _Damage(f"implausible tree depth {depth}")
        stack = [(root, 1)]
        while stack:
            pgno, level = stack.pop()
            page = self._page(pgno, level, depth)
            flags = struct.unpack_from("<H", page, 10)[0]
            if flags & P_LEAF2:
                continue  # fixed-size keys, no nodes (not used by hstore's tables)
            offsets = self._node_offsets(page, pgno)
            if flags & P_BRANCH:
                for off in offsets:
                    lo, hi, fl = struct.unpack_from("<HHH", page, off)
                    stack.append((lo | hi << 16 | fl << 32, level + 1))
                continue
            self._leaf_nodes(page, pgno, offsets, named)

    def _page(self, pgno: int, level: int, depth: int) -> bytes:
        if pgno < 2 or pgno >= self.npages:
            raise _Damage(f"page number {pgno} outside the file's {self.npages} pages")
        if pgno in self.seen:
            raise _Damage(f"page {pgno} is reached twice (a cycle or shared page)")
        if level > depth:
            raise _Damage(f"page {pgno} lies deeper than the tree's depth {depth}")
        self.seen.add(pgno)
        page = self._read(pgno * self.psize, self.psize)
        stored, _pad, flags, lower, upper = struct.unpack_from("<QHHHH", page, 0)
        if stored != pgno:
            raise _Damage(f"page {pgno} says it is page {stored}")
        if not flags & (P_BRANCH | P_LEAF) or flags & (P_OVERFLOW | P_SUBP):
            raise _Damage(f"page {pgno} has flags {flags:#x}, not a branch or leaf page")
        if (flags & P_BRANCH) != (level < depth):
            raise _Damage(f"page {pgno} is a {'branch' if flags & P_BRANCH else 'leaf'} at level {level} of {depth}")
        if not PAGE_HEADER <= lower <= upper <= self.psize or (lower - PAGE_HEADER) % 2:
            raise _Damage(f"page {pgno} has bad bounds lower={lower} upper={upper}")
        return page

    def _node_offsets(self, page: bytes, pgno: int) -> list[int]:
        lower, upper = struct.unpack_from("<HH", page, 12)
        n = (lower - PAGE_HEADER) // 2
        offsets = np.frombuffer(page, dtype="<u2", count=n, offset=PAGE_HEADER).astype(np.int64)
        if n and (offsets.min() < upper or offsets.max() > self.psize - NODE_HEADER):
            raise _Damage(f"page {pgno} has a node outside its bounds")
        return offsets.tolist()

    def _leaf_nodes(self, page: bytes, pgno: int, offsets: list[int], named: bool) -> None:
        arr = np.frombuffer(page, dtype=np.uint8)
        if not offsets:
            return
        off = np.asarray(offsets, dtype=np.int64)
        word = lambda at: arr[off + at].astype(np.int64) | arr[off + at + 1].astype(np.int64) << 8  # noqa: E731
        dsize, flags, ksize = word(0) | word(2) << 16, word(4), word(6)
        stored = np.where(flags & F_BIGDATA, 8, dsize)
        if ((off + NODE_HEADER + ksize + stored) > self.psize).any():
            raise _Damage(f"page {pgno} has a node that runs past the page")
        for i in np.flatnonzero(flags & (F_BIGDATA | F_SUBDATA | F_DUPDATA)).tolist():
            at = offsets[i] + NODE_HEADER + int(ksize[i])
            if flags[i] & F_BIGDATA:
                first = struct.unpack_from("<Q", page, at)[0]
                self._overflow(first, int(dsize[i]))
            elif flags[i] & F_SUBDATA and named and not flags[i] & F_DUPDATA:
                db = _DB.unpack_from(page, at)
                self._tree(db[7], db[2], named=False)

    def _overflow(self, first: int, nbytes: int) -> None:
        pages = -(-(nbytes + PAGE_HEADER) // self.psize)
        if first < 2 or first + pages > self.npages:
            raise _Damage(f"overflow pages {first}..{first + pages} outside the file's {self.npages} pages")
        head = self._read(first * self.psize, PAGE_HEADER)
        stored, _pad, flags, count = struct.unpack_from("<QHHI", head, 0)
        if stored != first or not flags & P_OVERFLOW or count < pages:
            raise _Damage(f"overflow page {first} is not what its node says")

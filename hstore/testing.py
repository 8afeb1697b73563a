"""Test doubles and fault injection for hstore users (and hstore's own tests).

* `FaultyEngine` wraps a real I/O engine and injects EIO, ENOSPC, short transfers, flipped
  bits and failed fsyncs into chosen ops (see `hstore.io.faulty`).
* `open_fd(path)`, `data_file_fd(dir)` find the descriptor a store opened for a file, to aim a
  fault at one device.
* `DictRemoteTier` is an in-process RemoteTier over a dict, with switches that make it
  unreachable or full, so a store's use of a remote tier can be tested without a server.
  (The Redis tier is tested against real servers.)
"""
from __future__ import annotations

import os
import threading
from typing import Sequence

import torch

from hstore.buffers import as_bytes
from hstore.format import data_file
from hstore.io.faulty import Fault, FaultRule, FaultyEngine
from hstore.record import checksum
from hstore.tiers.base import RemoteRecord, RemoteTier, WriteItem

__all__ = ["FaultyEngine", "FaultRule", "Fault", "open_fd", "data_file_fd", "DictRemoteTier"]


def open_fd(path: str | os.PathLike) -> int:
    """The lowest descriptor of this process open on `path` (Linux /proc); FileNotFoundError if none."""
    target = os.path.realpath(path)
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                fds.append(int(name))
        except OSError:
            continue
    if not fds:
        raise FileNotFoundError(f"no descriptor of this process is open on {path}")
    return min(fds)


class DictRemoteTier(RemoteTier):
    """A RemoteTier in a dict, shared by every store given the same instance (like two nodes on one server).

    Values are kept as (dtype, shape, bytes, checksum) and verified on every read, as a real
    remote tier must. Switches for tests: `reachable = False` makes every call fail (reads
    miss, writes drop); `max_items` makes writes beyond it drop (a full server); `corrupt(key)`
    flips a stored byte (the next read is a miss, counted, and the value is deleted).
    """

    name = "remote"

    def __init__(self, *, max_items: int | None = None):
        self.reachable = True
        self.max_items = max_items
        self._data: dict[bytes, tuple[torch.dtype, tuple[int, ...], bytearray, int]] = {}
        self._lock = threading.Lock()
        self._stats = dict(hits=0, misses=0, bytes_read=0, bytes_written=0, errors=0, dropped_writes=0,
                           corrupt=0, calls=0)
        self.closed = False

    def _count(self, **deltas) -> None:
        for k, v in deltas.items():
            self._stats[k] += v

    def write_many(self, items: Sequence[WriteItem]) -> list[bool]:
        with self._lock:
            self._count(calls=1)
            if not self.reachable:
                self._count(errors=1, dropped_writes=len(items))
                return [False] * len(items)
            ok = []
            for it in items:
                if self.max_items is not None and it.key not in self._data and len(self._data) >= self.max_items:
                    self._count(dropped_writes=1)
                    ok.append(False)
                    continue
                data = bytearray(as_bytes(it.payload).cpu().numpy().tobytes())
                self._data[it.key] = (it.dtype, tuple(it.shape), data, checksum(bytes(data)))
                self._count(bytes_written=len(data))
                ok.append(True)
            return ok

    def read_many(self, keys: Sequence[bytes]) -> list[RemoteRecord | None]:
        with self._lock:
            self._count(calls=1)
            if not self.reachable:
                self._count(errors=1, misses=len(keys))
                return [None] * len(keys)
            out: list[RemoteRecord | None] = []
            for k in keys:
                v = self._data.get(k)
                if v is None:
                    self._count(misses=1)
                    out.append(None)
                    continue
                dtype, shape, data, csum = v
                if checksum(bytes(data)) != csum:
                    del self._data[k]
                    self._count(corrupt=1, misses=1)
                    out.append(None)
                    continue
                payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
                self._count(hits=1, bytes_read=len(data))
                out.append(RemoteRecord(dtype, shape, payload))
            return out

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            self._count(calls=1)
            if not self.reachable:
                self._count(errors=1)
                return [False] * len(keys)
            return [k in self._data for k in keys]

    def delete_many(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            self._count(calls=1)
            if not self.reachable:
                self._count(errors=1)
                return
            for k in keys:
                self._data.pop(k, None)

    def corrupt(self, key: bytes, at: int = 0) -> None:
        """Flip one stored byte of `key` (a bad value on the server)."""
        with self._lock:
            self._data[key][2][at] ^= 0xFF

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._data)

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, items=len(self._data))

    def close(self) -> None:
        self.closed = True


def data_file_fd(directory: str | os.PathLike) -> int:
    """The descriptor this process has open on the NVMe data file in `directory`."""
    return open_fd(data_file(directory))

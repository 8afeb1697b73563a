"""Read leases: look up and pin many keys once, then copy rows of them with no per-key work.

A restore reads thousands of small items a batch at a time (a model layer's chunks).
`get_many_into` finds, pins, counts and unpins every key on every call: ~1-2 us of
host time per key, which for 2,048 chunks is more than the copy engine needs to move
them. A lease does that work once, in one pass under the catalog lock, and groups the
keys into runs that lie back to back in one arena and share a dtype and size;
`read_into(start, stop, out)` is then one copy per run overlapping those rows.

Measured on this repository's 2-core CPU machine (`benchmarks/hstore_read_overhead.py`): 1.0-1.7 us per
key against get_many_into's 1.4-2.4 when a layer's items lie back to back (the restore's case), but
2.7 against 2.0-2.3 when every item is its own run (a fragmented arena), where both pay one copy per
item anyway.

Only memory-tier copies (GPU, DRAM) are leased: `found[i]` is False for a key held
on NVMe, on the remote tier or nowhere, and the caller reads those the usual way.

A lease is a snapshot. A key overwritten, deleted or evicted while leased still reads
the value it had when leased: its slot is freed only once the lease ends. Close a
lease (or use it as a context manager) when done; the sources of non-blocking copies
stay pinned until those copies' CUDA events have completed. An abandoned lease is
closed when it is garbage-collected.
"""
from __future__ import annotations

import bisect
import ctypes
import time
import weakref
from typing import NamedTuple, Sequence

import torch

from hstore.buffers import as_bytes, copy_bytes
from hstore.catalog import Catalog
from hstore.errors import InvalidItemError
from hstore.ladder import TierLadder
from hstore.readpath import account_served


class _Run(NamedTuple):  # a tuple: a fragmented arena makes one per key, and a frozen dataclass costs ~1.5 us each
    """Rows [start, stop) of the leased keys: adjacent slots of one arena, one dtype and size."""

    start: int
    stop: int
    rung: int
    tier: object  # the ArenaTier holding them
    offset: int  # arena offset of row `start`
    row_bytes: int
    dtype: torch.dtype
    addr: int | None  # host address of row `start` (host arenas), else None


class _AllDone:
    """The events of a lease's non-blocking copies as one event (the catalog's deferred unpin)."""

    def __init__(self, events: list):
        self.events = events

    def query(self) -> bool:
        return all(e.query() for e in self.events)

    def synchronize(self) -> None:
        for e in self.events:
            e.synchronize()


class ReadLease:
    """Pinned memory-tier copies of `keys`, read by row ranges. Made by `TieredStore.lease`; used by one
    thread at a time (the store around it is thread-safe)."""

    def __init__(self, catalog: Catalog, ladder: TierLadder, keys: Sequence[bytes]):
        self._catalog = catalog
        self._names = [r.name for r in ladder.rungs]
        self._n = n = len(keys)
        self.found: list[bool] = [False] * n
        runs: list[_Run] = []
        locs: list = []
        readies: list = []
        tiers = [None if r.durable else r.tier for r in ladder.rungs]
        bases = [None if t is None else t.host_address(0) for t in tiers]  # host arenas: copies by address
        leased_keys: list[list[bytes]] = [[] for _ in tiers]
        now = time.time()
        with catalog.lock:
            catalog.check_open()
            catalog.finish_deferred(wait=False)
            get = catalog.entries.get
            found = self.found
            pin = locs.append
            start = last = rung = -2
            end = row_bytes = run_offset = 0
            dtype = None
            # The hot loop of a restore's lookup: per key only what a read must do (find, pin, count the access).
            for i, k in enumerate(keys):
                e = get(k)
                if e is None:
                    continue
                r = e.best
                if r < 0 or tiers[r] is None:
                    continue  # durable only: not leased
                loc = e.copies[r]
                off = loc.offset
                if off != end or i != last + 1 or r != rung or e.nbytes != row_bytes or e.dtype is not dtype:
                    if start >= 0:
                        runs.append(_Run(start, last + 1, rung, tiers[rung], run_offset, row_bytes, dtype,
                                         None if bases[rung] is None else bases[rung] + run_offset))
                    start, run_offset, rung, row_bytes, dtype = i, off, r, e.nbytes, e.dtype
                end = off + row_bytes
                last = i
                pin(loc)
                if e.ready is not None:
                    readies.append(e)
                e.hits += 1
                e.atime = now
            if start >= 0:
                runs.append(_Run(start, last + 1, rung, tiers[rung], run_offset, row_bytes, dtype,
                                 None if bases[rung] is None else bases[rung] + run_offset))
            for run in runs:  # a run is a range of consecutive leased keys: marked and listed a slice at a time
                found[run.start:run.stop] = [True] * (run.stop - run.start)
                leased_keys[run.rung].extend(keys[run.start:run.stop])
            for r, ks in enumerate(leased_keys):
                if ks:
                    catalog.policies[r].access_many(ks)
            catalog.pin_locked(locs)
            served = [len(ks) for ks in leased_keys]
            served_bytes = [0] * len(tiers)
            for run in runs:
                served_bytes[run.rung] += (run.stop - run.start) * run.row_bytes
            account_served(catalog.stats, ladder, served, served_bytes)
        for e in readies:  # a device-to-host put still copying into its slot
            ready = e.ready
            if ready is not None:
                ready.synchronize()
                e.ready = None
        self._runs = runs
        self._starts = [run.start for run in runs]
        kinds = {(run.dtype, run.row_bytes) for run in runs}
        self._uniform = kinds.pop() if len(kinds) == 1 else None  # every leased item of one dtype and size
        self._all_host = all(run.addr is not None for run in runs)
        self._events: list = []
        self._unpin = weakref.finalize(self, _unpin, catalog, locs, self._events)

    def __len__(self) -> int:
        return self._n

    @property
    def closed(self) -> bool:
        return not self._unpin.alive

    @property
    def where(self) -> list[str | None]:
        """Per key, the tier it was leased from (None: not leased)."""
        where: list[str | None] = [None] * self._n
        for run in self._runs:
            where[run.start:run.stop] = [self._names[run.rung]] * (run.stop - run.start)
        return where

    def count(self, start: int, stop: int) -> int:
        """How many of rows [start, stop) are leased."""
        return sum(self.found[start:stop])

    def read_into(self, start: int, stop: int, out: torch.Tensor, *, non_blocking: bool = False) -> list[bool]:
        """Copy the leased values of keys [start, stop) into the rows of `out` (one row per key, each the
        item's dtype and size); returns which rows were leased (the others are left as they were).
        `non_blocking`: device copies are queued on the current CUDA stream."""
        if not 0 <= start <= stop <= self._n:
            raise ValueError(f"rows [{start}, {stop}) are not within the lease's {self._n} keys")
        if self.closed:
            raise ValueError("read_into on a closed lease")
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or not out.is_contiguous() or out.device.type == "meta":
            raise InvalidItemError("out must be a contiguous tensor with one row per key (not meta)")
        if out.shape[0] != stop - start:
            raise ValueError(f"out has {out.shape[0]} rows for {stop - start} keys")
        if start == stop:
            return []
        row = out.numel() // out.shape[0] * out.element_size()  # out has >= 1 row here
        runs, starts = self._runs, self._starts
        lo = max(0, bisect.bisect_right(starts, start) - 1)
        hi = bisect.bisect_left(starts, stop, lo)  # runs[lo:hi] are those that may overlap [start, stop)
        kinds = ({self._uniform} if self._uniform is not None and lo < hi else
                 {(run.dtype, run.row_bytes) for run in runs[lo:hi] if run.stop > start})
        for dtype, row_bytes in kinds:  # before anything is copied
            if dtype is not out.dtype or row_bytes != row:
                raise InvalidItemError(f"output rows {out.dtype}{tuple(out.shape[1:])} do not match the leased "
                                       f"items ({dtype}, {row_bytes} bytes)")
        device_copy = False
        with self._catalog.operation():  # the store's close waits for these copies to be issued
            base = out.data_ptr()
            if out.device.type == "cpu" and self._all_host:  # host to host by address: no tensor views
                memmove = ctypes.memmove
                for run in runs[lo:hi]:
                    a = run.start if run.start > start else start
                    b = run.stop if run.stop < stop else stop
                    if a < b:
                        memmove(base + (a - start) * row, run.addr + (a - run.start) * row, (b - a) * row)
            else:
                flat = as_bytes(out)
                for run in runs[lo:hi]:
                    a, b = max(run.start, start), min(run.stop, stop)
                    if a >= b:
                        continue
                    offset, nbytes = run.offset + (a - run.start) * row, (b - a) * row
                    dst = flat.narrow(0, (a - start) * row, nbytes)
                    if run.addr is not None and dst.device.type == "cpu":
                        ctypes.memmove(dst.data_ptr(), run.addr + (a - run.start) * row, nbytes)
                        continue
                    view = run.tier.view_range(offset, nbytes)
                    nb = non_blocking and (dst.is_cuda or view.is_cuda)
                    copy_bytes(dst, view, non_blocking=nb)
                    device_copy = device_copy or nb
        if device_copy:
            ev = torch.cuda.Event()
            ev.record()
            self._events.append(ev)
        return self.found[start:stop]

    def close(self) -> None:
        """End the lease: its slots may be freed once its non-blocking copies have run. Idempotent."""
        self._unpin()

    def __enter__(self) -> "ReadLease":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unpin(catalog: Catalog, locs: list, events: list) -> None:
    with catalog.lock:
        if catalog.closed:
            return  # the store released everything
        if events:
            catalog.defer_unpin_locked(_AllDone(list(events)), locs)
        else:
            catalog.unpin_locked(locs)

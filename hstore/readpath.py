"""The read path: plan -> copy -> verify -> account -> promote, each step a function.

* `plan_reads` (under the catalog lock): which copy serves each key (the entry's best
  rung), pinned so it cannot be freed under the copy; the tier's policy hears the access.
* `copy_from_memory`: arena copies, grouped into runs of slots that lie back to back in
  the arena and in the output (one copy, one DMA, per run); host-to-host runs go by
  address with no tensor views. Non-blocking device copies keep their sources pinned
  until their CUDA event has run (deferred unpins).
* `read_durable` + `verify`: one batched read of the durable records, each checked by the
  tier against its header, key, dtype, shape and checksum; a bad record becomes a miss and
  is dropped from the index (`drop_bad`).
* `read_remote`: keys no local tier holds, asked of the remote tier in one call.
* `account`: counters per key and per tier, once per call.
* `promote_read`: values read from a slower tier are copied into faster ones.

`Reader` runs these steps for the store's read calls.

Every step is batched per call: the per-key work is a few attribute reads, which is what
lets a restore read thousands of small chunks with microseconds of host time per key.
"""
from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from hstore.buffers import as_bytes, copy_bytes
from hstore.catalog import Catalog
from hstore.entry import Entry
from hstore.ladder import TierLadder
from hstore.errors import DeviceError, InvalidItemError
from hstore.readouts import BufferList, StackedRows, readouts
from hstore.stats import StoreStats
from hstore.tiers.base import DurableRead, Location, ReadStatus, RemoteRecord

log = logging.getLogger(__name__)

Read = tuple  # (output index, entry, rung index, location)


@dataclass
class ReadPlan:
    """What `plan_reads` decided: reads per kind of tier, and the keys it could not serve."""

    memory: list[Read] = field(default_factory=list)
    durable: list[Read] = field(default_factory=list)
    absent: list[int] = field(default_factory=list)  # output indices no local tier holds
    replaced: list[int] = field(default_factory=list)  # get_many: overwritten with another dtype/shape
    found: list[bool] = field(default_factory=list)
    held: list[Location] = field(default_factory=list)  # sources of non-blocking copies still running
    event: object = None
    bad: list[tuple[Read, ReadStatus]] = field(default_factory=list)
    remote_found: list[int] = field(default_factory=list)
    remote_bytes: int = 0


def plan_reads(catalog: Catalog, keys: Sequence[bytes], outs: BufferList | StackedRows,
               expect: Sequence[Entry] | None = None) -> ReadPlan:
    """Choose and pin the copy that serves each key. With `expect` (get_many: the entries it sized
    its outputs for), a key overwritten since with another dtype or shape goes to `replaced`."""
    plan = ReadPlan(found=[False] * len(keys))
    memory, durable, absent = plan.memory, plan.durable, plan.absent
    now = time.time()
    with catalog.lock:
        catalog.check_open()
        catalog.finish_deferred(wait=False)
        get = catalog.entries.get
        entries = [get(k) for k in keys]
        if expect is None:
            outs.check(entries)  # before anything is pinned
        d = catalog.durable
        rungs = set()
        for i, e in enumerate(entries):
            if e is None:
                absent.append(i)
                continue
            if expect is not None and e is not expect[i]:
                ex = expect[i]
                if ex is None or e.dtype != ex.dtype or e.shape != ex.shape:
                    plan.replaced.append(i)  # get_many sizes a (new) buffer and reads again
                    continue
            r = e.best
            (durable if r == d else memory).append((i, e, r, e.copies[r]))
            rungs.add(r)
            e.hits += 1
            e.atime = now
        policies = catalog.policies
        for reads in (memory, durable):
            if reads:
                if len(rungs) == 1:  # the usual case: one tier serves the whole batch
                    policies[reads[0][2]].access_many([p[1].key for p in reads])
                else:
                    for p in reads:
                        policies[p[2]].access(p[1].key)
                catalog.pin_locked([p[3] for p in reads])
    return plan


def adjacent_runs(reads: Sequence[Read], outs: BufferList | StackedRows) -> list[list[Read]]:
    """Group reads whose sources (one rung, back to back) and outputs are both adjacent.

    A layer's chunks are put together and so usually lie side by side in the arena; so do
    the caller's per-chunk output rows. Each run is then one copy instead of one per chunk.
    """
    runs: list[list[Read]] = []
    stacked = isinstance(outs, StackedRows)
    pi = pr = pend = -1
    for p in reads:
        i, _, r, loc = p
        if r == pr and loc.offset == pend and (i == pi + 1 if stacked else outs.follows(pi, i, runs[-1][-1][3].nbytes)):
            runs[-1].append(p)
        else:
            runs.append([p])
        pi, pr, pend = i, r, loc.offset + loc.nbytes
    return runs


def copy_from_memory(plan: ReadPlan, ladder: TierLadder, outs: BufferList | StackedRows, non_blocking: bool) -> None:
    """Copy every planned arena read into its output, one copy per adjacent run."""
    if not plan.memory:
        return
    if isinstance(outs, StackedRows) and outs.cpu and _copy_host_rows(plan, ladder, outs):
        return
    rungs = ladder.rungs
    found = plan.found
    memmove = ctypes.memmove
    held = plan.held
    for run in adjacent_runs(plan.memory, outs):
        for p in run:
            ready = p[1].ready
            if ready is not None:  # a device-to-host put still copying into this slot
                ready.synchronize()
                p[1].ready = None
        i0, _, r, first = run[0]
        last = run[-1][3]
        nbytes = last.offset + last.nbytes - first.offset
        tier = rungs[r].tier
        src = tier.host_address(first.offset) if outs.cpu else None
        if src is not None:
            if nbytes:
                memmove(outs.address(i0), src, nbytes)
        else:
            view = tier.view_range(first.offset, nbytes)
            ob = outs.span(i0, nbytes)
            nb = non_blocking and (ob.is_cuda or view.is_cuda)
            copy_bytes(ob, view, non_blocking=nb)
            if nb:
                held.extend(p[3] for p in run)
        for p in run:
            found[p[0]] = True
    if held:
        plan.event = torch.cuda.Event()
        plan.event.record()


def _copy_host_rows(plan: ReadPlan, ladder: TierLadder, outs: StackedRows) -> bool:
    """`copy_from_memory` for host arenas into the host rows of one tensor: runs found and copied
    in one pass, by address (no tensor views). False, having done nothing, if a source is on a device."""
    bases = [None if r.durable else r.tier.host_address(0) for r in ladder.rungs]
    on_device = any(b is None and not r.durable for r, b in zip(ladder.rungs, bases))
    if on_device and any(bases[p[2]] is None for p in plan.memory):
        return False
    memmove = ctypes.memmove
    found = plan.found
    row, obase = outs.row_bytes, outs.address(0)
    src = dst = length = 0
    prev_r = prev_i = prev_end = -1
    for i, e, r, loc in plan.memory:
        ready = e.ready
        if ready is not None:  # a device-to-host put still copying into this slot
            ready.synchronize()
            e.ready = None
        if r == prev_r and i == prev_i + 1 and loc.offset == prev_end:
            length += loc.nbytes
        else:
            if length:
                memmove(dst, src, length)
            src, dst, length = bases[r] + loc.offset, obase + i * row, loc.nbytes
        prev_r, prev_i, prev_end = r, i, loc.offset + loc.nbytes
        found[i] = True
    if length:
        memmove(dst, src, length)
    return True


def read_durable(plan: ReadPlan, ladder: TierLadder, outs: BufferList | StackedRows) -> None:
    """One batched read of every planned durable record, verified by the tier; bad ones go to `plan.bad`."""
    if not plan.durable:
        return
    tier = ladder.durable.tier
    reads = [DurableRead(e.key, e.dtype, e.shape, loc, outs[i]) for i, e, _, loc in plan.durable]
    for p, status in zip(plan.durable, tier.read_many(reads)):
        if status == ReadStatus.OK:
            plan.found[p[0]] = True
        else:
            plan.bad.append((p, status))


def release(catalog: Catalog, plan: ReadPlan) -> None:
    """Unpin what was read, except sources of non-blocking copies: they wait for their event."""
    held = plan.held
    with catalog.lock:
        if held:
            ids = {id(loc) for loc in held}
            catalog.unpin_locked([p[3] for p in plan.memory if id(p[3]) not in ids])
            catalog.defer_unpin_locked(plan.event, held)
        else:
            catalog.unpin_locked([p[3] for p in plan.memory])
        catalog.unpin_locked([p[3] for p in plan.durable])


def drop_bad(catalog: Catalog, plan: ReadPlan) -> None:
    """Count, log and drop every record that failed its read: from now on it is a miss."""
    if not plan.bad:
        return
    with catalog.lock:
        for (_, e, _, loc), status in plan.bad:
            if status == ReadStatus.CORRUPT:
                catalog.stats.corrupt_chunks += 1
            else:
                catalog.stats.io_errors += 1
    for (_, e, _, loc), status in plan.bad:
        log.error("%s chunk for key %r at %s device %d offset %d: dropped",
                  "corrupt" if status == ReadStatus.CORRUPT else "unreadable", e.key[:80], loc.tier, loc.device,
                  loc.offset)
    catalog.drop_indexed([p[1].key for p, _ in plan.bad], only=[p[3] for p, _ in plan.bad])


def read_remote(ladder: TierLadder, keys: Sequence[bytes], indices: Sequence[int],
                place: Callable[[int, RemoteRecord], bool]) -> list[tuple[int, RemoteRecord]]:
    """Ask the remote tier for keys no local tier holds; `place(i, record)` puts a record into
    output i (False when it does not fit: a miss). Returns the (index, record) pairs placed."""
    if ladder.remote is None or not indices:
        return []
    try:
        records = ladder.remote.read_many([keys[i] for i in indices])
    except Exception as e:  # noqa: BLE001 - a remote failure is a miss, never an error
        log.warning("remote tier read failed: %s", e)
        return []
    placed = []
    for i, rec in zip(indices, records):
        if rec is not None and place(i, rec):
            placed.append((i, rec))
    return placed


def account(stats: StoreStats, ladder: TierLadder, plan: ReadPlan, n_keys: int) -> None:
    """Count one get per key: a hit in the tier that served it, a miss in every tier above it."""
    rungs = ladder.rungs
    served = [0] * len(rungs)
    served_bytes = [0] * len(rungs)
    found = plan.found
    for p in plan.memory:
        r = p[2]
        served[r] += 1
        served_bytes[r] += p[1].nbytes
    for p in plan.durable:
        if found[p[0]]:
            served[p[2]] += 1
            served_bytes[p[2]] += p[1].nbytes
    remote_hits = len(plan.remote_found)
    misses = n_keys - sum(served) - remote_hits - len(plan.replaced)
    account_served(stats, ladder, served, served_bytes, misses=misses, remote_hits=remote_hits)
    if ladder.remote is not None:
        rs = stats.tier(ladder.remote.name)
        rs.hits += remote_hits
        rs.misses += len(plan.absent) - remote_hits
        rs.bytes_read += plan.remote_bytes


def account_served(stats: StoreStats, ladder: TierLadder, served: Sequence[int], served_bytes: Sequence[int], *,
                   misses: int = 0, remote_hits: int = 0) -> None:
    """Count gets by rung: `served[r]` keys (`served_bytes[r]` bytes) hit at rung r, so missed every rung above
    it; `misses` missed every local rung and the remote; `remote_hits` were found only on the remote."""
    rungs = ladder.rungs
    hits = sum(served) + remote_hits
    below = misses + remote_hits  # keys that missed every local rung so far
    for r in range(len(rungs) - 1, -1, -1):  # a key served at rung r missed every rung above it
        ts = rungs[r].stats
        ts.hits += served[r]
        ts.bytes_read += served_bytes[r]
        ts.misses += below
        below += served[r]
    stats.gets += hits + misses
    stats.hits += hits
    stats.misses += misses


def promote_read(ladder: TierLadder, plan: ReadPlan, outs: BufferList | StackedRows) -> None:
    """Copy what was read from a slower tier into the faster ones (when room can be made at once)."""
    found = plan.found
    for i, e, r, _ in plan.memory + plan.durable:
        if r and found[i]:
            out = outs[i]
            for target in reversed(ladder.promotion_targets(r, out.device)):  # the landing tier first
                ladder.promote(e, target, out)


def output_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device the store can read to; DeviceError (an hstore error) when it cannot be used."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"not a usable device {device!r}: {e}") from None
    if dev.type == "meta":
        raise InvalidItemError("cannot read into meta tensors: they hold no data")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"cannot read to {dev}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"cannot read to {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, AssertionError) as e:  # out of device memory, a device torch cannot use
        raise DeviceError(f"cannot allocate a {dtype}{tuple(shape)} output on {device}: {e}") from e


class Reader:
    """The read calls of the store (get_many, get_many_into, locate), run as the steps above."""

    def __init__(self, catalog: Catalog, ladder: TierLadder, *, promote_on_hit: bool):
        self.catalog = catalog
        self.ladder = ladder
        self.promote_on_hit = promote_on_hit
        self._names = [r.name for r in ladder.rungs]

    def read_into(self, keys: list[bytes], outs, *, non_blocking: bool = False, promote: bool | None = None) -> list[bool]:
        rows = readouts(outs)

        def place(i: int, rec: RemoteRecord) -> bool:
            if not rows.fits(i, rec.dtype, rec.payload.numel()):
                log.warning("remote value of %r is %s%s, not what the output holds: a miss", keys[i][:80],
                            rec.dtype, tuple(rec.shape))
                return False
            copy_bytes(rows.span(i, rec.payload.numel()), rec.payload)
            return True

        plan = self._run(keys, rows, None, non_blocking, promote, place)
        return plan.found

    def get_many(self, keys: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
        result: list[torch.Tensor | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        while todo:  # again for keys overwritten with another dtype or shape while being read
            with self.catalog.lock:
                self.catalog.check_open()
                metas = [self.catalog.entries.get(keys[i]) for i in todo]
            outs = [_empty(e.shape, e.dtype, device) if e is not None else None for e in metas]
            sub = [keys[i] for i in todo]

            def place(j: int, rec: RemoteRecord, outs=outs) -> bool:
                t = _empty(rec.shape, rec.dtype, device)
                copy_bytes(as_bytes(t), rec.payload.to(device) if device.type != "cpu" else rec.payload)
                outs[j] = t
                return True

            plan = self._run(sub, BufferList(outs), metas, False, None, place)
            for j, ok in enumerate(plan.found):
                if ok:
                    result[todo[j]] = outs[j]
            todo = [todo[j] for j in plan.replaced]
        return result

    def locate(self, keys: list[bytes]) -> list[str | None]:
        names = self._names
        cat = self.catalog
        with cat.lock:
            cat.check_open()
            get = cat.entries.get
            where = [None if e is None else names[e.best] for e in map(get, keys)]
        remote = self.ladder.remote
        if remote is not None and None in where:
            missing = [i for i, w in enumerate(where) if w is None]
            try:
                present = remote.contains_many([keys[i] for i in missing])
            except Exception as e:  # noqa: BLE001 - unreachable is "not there"
                log.warning("remote tier lookup failed: %s", e)
                present = [False] * len(missing)
            for i, p in zip(missing, present):
                if p:
                    where[i] = remote.name
        return where

    def delete_remote(self, keys: list[bytes]) -> None:
        try:
            self.ladder.remote.delete_many(keys)
        except Exception as e:  # noqa: BLE001 - best effort: the server may be away
            log.warning("remote tier delete failed: %s", e)

    # ------------------------------------------------------------------ the steps, in order
    def _run(self, keys, rows, expect, non_blocking, promote, place) -> ReadPlan:
        cat, ladder = self.catalog, self.ladder
        plan = plan_reads(cat, keys, rows, expect)
        try:
            copy_from_memory(plan, ladder, rows, non_blocking)
            read_durable(plan, ladder, rows)
        finally:
            release(cat, plan)
        drop_bad(cat, plan)
        promote = self.promote_on_hit if promote is None else promote
        if plan.absent and ladder.remote is not None:
            placed = read_remote(ladder, keys, plan.absent, place)
            for i, _ in placed:
                plan.found[i] = True
            plan.remote_found = [i for i, _ in placed]
            plan.remote_bytes = sum(rec.payload.numel() for _, rec in placed)
            if promote:
                for i, rec in placed:
                    self._adopt(keys[i], rec)
        with cat.lock:
            account(cat.stats, ladder, plan, len(keys))
        if promote:
            promote_read(ladder, plan, rows)
        return plan

    def _adopt(self, key: bytes, rec: RemoteRecord) -> None:
        """Keep a value found on the remote tier in the landing tier (clean: the remote has it)."""
        cat, landing = self.catalog, self.ladder.landing
        nbytes = rec.payload.numel()
        if landing.tier.footprint(nbytes) > landing.tier.capacity:
            return
        with cat.lock:
            if cat.closed or key in cat.entries:
                return
            loc = self.ladder.allocate_evicting_locked(landing, nbytes)
            if loc is None:
                return
            cat.pin_locked([loc])
        copy_bytes(landing.tier.view(loc), rec.payload)
        with cat.lock:
            cat.unpin_locked([loc])
            if cat.closed or key in cat.entries:
                landing.tier.free(loc)
                return
            e = cat.new_entry_locked(key, rec.dtype, tuple(rec.shape), nbytes, None, time.time())
            cat.install_locked(e, 0, False)
            cat.add_copy_locked(e, landing.index, loc)
            landing.stats.promotions += 1
            landing.stats.bytes_written += nbytes

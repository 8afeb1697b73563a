"""The catalog: what the store holds, where each copy is, and what still has to be written.

One object owns the key map and every rule that ties copies together:

* an `Entry` per key, with its copies keyed by tier (a list indexed by rung of the tier
  ladder) and `best`, the rung a read is served from (the first one holding a copy);
* the residency order of each tier (its eviction policy), kept in step with the copies;
* the dirty queue (entries whose newest bytes still have to reach the durable or remote
  tier, in put order), the memory-only set (entries the durable tier will never hold);
* pins (a location being read or flushed is never freed under its reader), pending frees
  and deferred unpins (non-blocking copies that release their source once their event ran);
* the mirror of the durable index: `indexed[key]` is the record the LMDB index holds for
  key. An entry's durable copy is always its own record; after an overwrite, the index
  keeps the previous value's record until the new value is committed (or drops it at
  once when the new value will never be durable: see `install`).

Locks, in the only order they are ever taken:

    commit_lock   serialises index mutations with the catalog changes they imply
                  (flusher commits, deletes, durable evictions, dropped bad records)
    lock          (an RLock; `cv` is its condition) guards every field here, policies and
                  the store's counters; held briefly, never across I/O
    tier locks    each tier's allocator lock (leaf locks, taken inside `free` calls)

Methods whose names say "locked" expect the caller to hold `lock`; the others take what
they need. The catalog never calls the store: it is given typed callbacks (`free` a
location, `view` a location as bytes) and the index.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch

from hstore.entry import NEEDS_DURABLE, NEEDS_REMOTE, Entry, index_entry
from hstore.errors import StoreClosedError, StoreIOError
from hstore.index import IndexEntry
from hstore.policy.base import EvictionPolicy
from hstore.stats import StoreStats
from hstore.tiers.base import Location, WriteItem

class IndexWriter(Protocol):
    """What the catalog needs of the LMDB index: short write transactions."""

    def put_many(self, entries: Iterable[IndexEntry]) -> None: ...

    def delete_many(self, keys: Iterable[bytes]) -> None: ...


@dataclass
class FlushBatch:
    """Dirty entries handed to the flusher (their landing copies pinned until `finish`)."""

    entries: list[Entry]
    items: list[WriteItem]
    durable: list[bool]  # per item: write it to the durable tier
    remote: list[bool]  # per item: write it to the remote tier
    events: list = field(default_factory=list)  # device-to-host copies to wait for first


@dataclass
class _DeferredUnpin:
    event: object
    locs: list[Location]


class Catalog:
    """Entries, copies per tier, dirty queue, pins, pending frees, deferred unpins, index mirror."""

    def __init__(
        self,
        policies: Sequence[EvictionPolicy],
        *,
        landing: int,
        durable: int | None,
        free: Callable[[Location], None],
        view: Callable[[Location], torch.Tensor],
        index: IndexWriter | None,
        stats: StoreStats,
    ):
        self.lock = threading.RLock()
        self.cv = threading.Condition(self.lock)
        self.commit_lock = threading.Lock()
        self.policies = list(policies)
        self.landing = landing
        self.durable = durable
        self.stats = stats
        self._free = free
        self._view = view
        self._index = index
        self.entries: dict[bytes, Entry] = {}
        self.indexed: dict[bytes, Location] = {}
        self.dirty: dict[bytes, Entry] = {}  # insertion order = flush order
        self.memory_only: dict[bytes, Entry] = {}
        self._pins: dict[Location, int] = {}
        self._pending_free: set[Location] = set()
        self._deferred: list[_DeferredUnpin] = []
        self._seq = 0
        self._active = 0
        self.closed = False
        self.flush_failures = 0
        self.last_flush_error: BaseException | None = None

    # ------------------------------------------------------------------ lifetime
    @contextmanager
    def operation(self) -> Iterator[None]:
        """A call that uses tiers, an engine or the index outside the lock: `close()` waits for it."""
        with self.lock:
            if self.closed:
                raise StoreClosedError("the store is closed")
            self._active += 1
        try:
            yield
        finally:
            with self.cv:
                self._active -= 1
                if not self._active:
                    self.cv.notify_all()

    def check_open(self) -> None:
        if self.closed:
            raise StoreClosedError("the store is closed")

    def close(self) -> None:
        """Refuse new operations and wait for the ones already past their open check."""
        with self.cv:
            self.closed = True
            self.cv.notify_all()
            while self._active:
                self.cv.wait()

    def next_seq_locked(self) -> int:
        self._seq += 1
        return self._seq

    @property
    def seq(self) -> int:
        return self._seq

    # ------------------------------------------------------------------ copies (lock held)
    def add_copy_locked(self, e: Entry, rung: int, loc: Location) -> None:
        e.copies[rung] = loc
        if e.best < 0 or rung < e.best:
            e.best = rung
        self.policies[rung].insert(e.key, loc.length, e.cost)

    def drop_copy_locked(self, e: Entry, rung: int) -> Location | None:
        """Remove e's copy on `rung` from the entry and the policy; the caller frees or releases it."""
        loc = e.copies[rung]
        if loc is None:
            return None
        e.copies[rung] = None
        if rung != self.durable:
            self.policies[rung].remove(e.key)
        if e.best == rung:
            e.best = next((r for r, c in enumerate(e.copies) if c is not None), -1)
        return loc

    def drop_volatile_locked(self, e: Entry) -> None:
        """Release e's memory-tier copies (deferred while readers hold them)."""
        for rung, loc in enumerate(e.copies):
            if loc is not None and rung != self.durable:
                self.drop_copy_locked(e, rung)
                self.release_locked(loc)

    def forget_if_empty_locked(self, e: Entry) -> None:
        """Drop an entry that lost its last copy (a cache's normal loss, counted)."""
        if self.entries.get(e.key) is e and e.best < 0 and not e.pending:
            del self.entries[e.key]
            self.memory_only.pop(e.key, None)
            self.stats.dropped += 1

    # ------------------------------------------------------------------ pins (lock held)
    def pin_locked(self, locs: Iterable[Location]) -> None:
        pins = self._pins
        get = pins.get
        for loc in locs:
            pins[loc] = get(loc, 0) + 1

    def unpin_locked(self, locs: Iterable[Location]) -> None:
        pins = self._pins
        for loc in locs:
            n = pins[loc] - 1
            if n:
                pins[loc] = n
            else:
                del pins[loc]
                if loc in self._pending_free:
                    self._pending_free.discard(loc)
                    self._free(loc)

    def pinned(self, loc: Location) -> bool:
        return loc in self._pins

    def release_locked(self, loc: Location) -> None:
        """Free `loc` now, or once its last reader unpins it."""
        if loc in self._pins:
            self._pending_free.add(loc)
        else:
            self._free(loc)

    def defer_unpin_locked(self, event, locs: list[Location]) -> None:
        """Unpin `locs` once `event` (a CUDA event after non-blocking copies) has completed."""
        self._deferred.append(_DeferredUnpin(event, locs))

    def finish_deferred(self, *, wait: bool) -> None:
        with self.lock:
            if not self._deferred:
                return
            keep = []
            for d in self._deferred:
                if wait:
                    d.event.synchronize()
                if wait or d.event.query():
                    self.unpin_locked(d.locs)
                else:
                    keep.append(d)
            self._deferred = keep

    # ------------------------------------------------------------------ writes (lock held)
    def new_entry_locked(self, key: bytes, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int,
                         cost: float | None, now: float) -> Entry:
        return Entry(key, dtype, shape, nbytes, self.next_seq_locked(), cost, [None] * len(self.policies),
                     created=now, atime=now)

    def install_locked(self, e: Entry, pending: int, memory_only: bool) -> None:
        """Make `e` the key's entry, replacing (and releasing the copies of) any previous one.

        The previous value's durable record stays indexed until `e` is committed; when `e`
        will never be durable (memory_only), the caller has already dropped that record
        (`drop_indexed`), so no later read or restart can pair it with e's dtype and shape.
        """
        old = self.entries.get(e.key)
        if old is not None:
            self._retire_locked(old)
        self.entries[e.key] = e
        if pending:
            e.pending = pending
            self.dirty[e.key] = e
            self.cv.notify_all()
        if memory_only:
            e.memory_only = True
            self.memory_only[e.key] = e

    def _retire_locked(self, old: Entry) -> None:
        """An entry leaves the key map (overwrite or delete): its copies go, its writes are cancelled."""
        self.drop_volatile_locked(old)
        if self.durable is not None and old.copies[self.durable] is not None:
            old.copies[self.durable] = None  # still indexed: `indexed` keeps it until replaced or deleted
        old.best = -1
        old.pending = 0
        if self.dirty.get(old.key) is old:
            del self.dirty[old.key]
        if self.memory_only.get(old.key) is old:
            del self.memory_only[old.key]

    def remove_locked(self, key: bytes) -> Entry | None:
        """Take `key` out of the key map (its durable record is dropped separately, `drop_indexed`)."""
        e = self.entries.pop(key, None)
        if e is not None:
            self._retire_locked(e)
        return e

    def mark_pending_locked(self, e: Entry, pending: int) -> None:
        """e owes writes again (e.g. a GPU copy written back to DRAM): queue it for the flusher."""
        if pending and self.dirty.get(e.key) is None:
            e.pending |= pending
            self.dirty[e.key] = e
            self.cv.notify_all()

    # ------------------------------------------------------------------ the durable index
    def load_indexed(self, entries: Iterable[tuple[IndexEntry, Location]]) -> None:
        """Entries read from the index at open: durable copies only, access order by atime."""
        with self.lock:
            loaded = []
            for ie, loc in entries:
                e = Entry(ie.key, ie.dtype, ie.shape, ie.nbytes, 0, None, [None] * len(self.policies),
                          created=ie.created, atime=ie.atime, hits=ie.hits, saved_hits=ie.hits)
                e.copies[self.durable] = loc
                e.best = self.durable
                self.entries[ie.key] = e
                self.indexed[ie.key] = loc
                loaded.append(e)
            policy = self.policies[self.durable]
            for e in sorted(loaded, key=lambda e: e.atime):
                policy.insert(e.key, e.copies[self.durable].length, None)

    def drop_indexed(self, keys: Sequence[bytes], only: Sequence[Location] | None = None) -> int:
        """Remove the keys' records from the index at once (delete, a bad read, a memory-only overwrite).

        With `only`, a key's record is dropped only if it still is that location (a read that
        found it corrupt must not drop a newer record committed meanwhile). Returns how many
        were dropped. Raises StoreIOError when the index write fails (nothing changed then).
        """
        with self.commit_lock:
            return self.drop_indexed_committing(keys, only)

    def drop_indexed_committing(self, keys: Sequence[bytes], only: Sequence[Location] | None = None) -> int:
        """`drop_indexed` for a caller that holds `commit_lock` already."""
        with self.lock:
            victims = list({k: self.indexed[k] for i, k in enumerate(keys)
                            if k in self.indexed and (only is None or self.indexed[k] is only[i])}.items())
        if not victims:
            return 0
        self._index.delete_many([k for k, _ in victims])
        with self.lock:
            for k, loc in victims:
                self._unindex_locked(k, loc)
        return len(victims)

    def _unindex_locked(self, key: bytes, loc: Location) -> None:
        if self.indexed.get(key) is not loc:
            return  # already dropped (a key named twice in one call)
        del self.indexed[key]
        self.policies[self.durable].remove(key)
        e = self.entries.get(key)
        if e is not None and e.copies[self.durable] is loc:
            self.drop_copy_locked(e, self.durable)
            self.forget_if_empty_locked(e)
        self.release_locked(loc)

    def evict_durable(self, need: int) -> int:
        """Drop the least valuable indexed records (by the durable tier's policy) until `need`
        bytes are freed or nothing unpinned is left; returns the bytes freed."""
        with self.commit_lock:
            with self.lock:
                policy = self.policies[self.durable]
                victims, freed = [], 0
                while freed < need:
                    k = policy.pop_victim(skip=lambda k: k in self.indexed and self.indexed[k] in self._pins)
                    if k is None:
                        break
                    loc = self.indexed.get(k)
                    if loc is not None:
                        victims.append((k, loc))
                        freed += loc.length
            if not victims:
                return 0
            try:
                self._index.delete_many([k for k, _ in victims])
            except BaseException:
                with self.lock:
                    for k, loc in victims:
                        policy.insert(k, loc.length, None)
                raise
            with self.lock:
                for k, loc in victims:
                    self._unindex_locked(k, loc)
                self.stats.tier(victims[0][1].tier).evictions += len(victims)
            return freed

    def access_changed(self) -> list[tuple[Entry, Location]]:
        """Indexed entries whose access statistics changed since the index last saw them."""
        with self.lock:
            d = self.durable
            return [(e, e.copies[d]) for e in self.entries.values()
                    if d is not None and e.copies[d] is not None and e.hits != e.saved_hits]

    # ------------------------------------------------------------------ the flusher's side
    def next_batch(self, max_bytes: int, wait_s: float = 0.1) -> FlushBatch | None:
        """Dirty entries to write next (landing copies pinned), oldest first; waits briefly when none."""
        with self.cv:
            if not self.dirty and not self.closed:
                self.cv.wait(wait_s)
            entries, total = [], 0
            for e in self.dirty.values():
                if e.flushing is not None:
                    continue
                if entries and total + e.nbytes > max_bytes:
                    break
                src = e.copies[self.landing]
                if src is None:  # cannot happen: dirty entries keep their landing copy
                    continue
                entries.append(e)
                total += e.nbytes
                e.flushing = src
                self._pins[src] = self._pins.get(src, 0) + 1
            if not entries:
                return None
            items = [WriteItem(e.key, self._view(e.flushing), e.dtype, e.shape) for e in entries]
            events = [e.ready for e in entries if e.ready is not None]
            return FlushBatch(entries, items, [bool(e.pending & NEEDS_DURABLE) for e in entries],
                              [bool(e.pending & NEEDS_REMOTE) for e in entries], events)

    def commit(self, batch: FlushBatch, locs: Sequence[Location | None],
               remote: Sequence[bool | None] = ()) -> None:
        """Index the batch's new durable records (already durable on the device), count what the
        remote tier took (`remote`: True written, False dropped, None not sent), then mark the
        entries written. Records of entries overwritten or deleted meanwhile are freed."""
        with self.commit_lock:
            with self.lock:
                current = [(e, loc) for e, loc in zip(batch.entries, locs)
                           if loc is not None and self.entries.get(e.key) is e]
                stale = [loc for e, loc in zip(batch.entries, locs)
                         if loc is not None and self.entries.get(e.key) is not e]
            if current:
                try:
                    self._index.put_many([index_entry(e, loc) for e, loc in current])
                except BaseException:
                    with self.lock:
                        for loc in (loc for loc in locs if loc is not None):
                            self._free(loc)
                    raise
            with self.cv:
                for e, loc in current:
                    prev = self.indexed.get(e.key)
                    self.indexed[e.key] = loc  # what the index holds now, even if e was overwritten meanwhile
                    if prev is not None:
                        if e.copies[self.durable] is prev:
                            e.copies[self.durable] = None
                        self.release_locked(prev)
                    self.policies[self.durable].insert(e.key, loc.length, e.cost)
                    if self.entries.get(e.key) is e:
                        e.copies[self.durable] = loc
                        e.best = min(e.best, self.durable) if e.best >= 0 else self.durable
                    e.saved_hits = e.hits
                    self.stats.tier(loc.tier).bytes_written += e.nbytes
                for loc in stale:
                    self._free(loc)
                for e in batch.entries:
                    if self.entries.get(e.key) is e and self.dirty.get(e.key) is e:
                        e.pending = 0
                        del self.dirty[e.key]
                self.stats.flushes += 1
                self.stats.bytes_flushed += sum(e.nbytes for e, _ in current)
                if any(r is not None for r in remote):
                    self.stats.remote_writes_dropped += sum(r is False for r in remote)
                    self.stats.bytes_shared += sum(e.nbytes for e, r in zip(batch.entries, remote) if r)
                self.cv.notify_all()

    def abort(self, batch: FlushBatch, error: BaseException) -> None:
        """The batch failed: it stays dirty (retried later) and flush() callers are told."""
        with self.cv:
            self.flush_failures += 1
            self.stats.flush_failures += 1
            self.last_flush_error = error
            self.cv.notify_all()

    def finish(self, batch: FlushBatch) -> None:
        """Unpin the batch's landing copies (after commit or abort)."""
        with self.cv:
            for e in batch.entries:
                if e.flushing is not None:
                    self.unpin_locked([e.flushing])
                    e.flushing = None
            self.cv.notify_all()

    # ------------------------------------------------------------------ flush()'s side
    def wait_written(self, target: int, alive: Callable[[], bool], poll_s: float = 0.05) -> None:
        """Return once no entry put at or before sequence `target` still owes a write.

        Raises StoreIOError when a batch fails while waiting, or the flusher has stopped.
        """
        with self.cv:
            failures = self.flush_failures
            self.cv.notify_all()
            while True:
                oldest = next(iter(self.dirty.values()), None)
                if oldest is None or oldest.seq > target:
                    return
                err = self.last_flush_error
                if self.flush_failures > failures:
                    raise StoreIOError(f"flush failed: {err}", getattr(err, "errno", 0) or 0)
                if not alive():
                    raise StoreIOError(f"the flusher has stopped: {err}")
                if self.closed:
                    raise StoreClosedError("the store was closed during flush")
                self.cv.wait(poll_s)

    def memory_only_keys(self, target: int) -> tuple[bytes, ...]:
        with self.lock:
            return tuple(k for k, e in self.memory_only.items() if e.seq <= target)

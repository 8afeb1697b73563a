"""TieredStore: a dict-like store of tensors over GPU, host-DRAM and NVMe tiers.

The store composes tiers and policies and owns nothing tier-specific (navy's
hybrid cache). Its rules:

* `put` lands in DRAM and returns; a background flusher writes batches to NVMe
  (two-stage saving). An item's DRAM copy is never dropped before it is on NVMe
  (unless NVMe admission declined it: then DRAM is its only home).
* Reads look in GPU, then DRAM, then NVMe, and may promote what they find.
* The LMDB index is written only after the data it points at is durable, and
  every NVMe read is checked against the checksum kept in the index: after a
  crash a key is served exactly as put, or it is a miss.
* A location being read is pinned; space is freed only when no reader holds it.

Locks: `_lock` guards the in-memory maps and is held only briefly; `_index_lock`
serialises index mutations (flusher commits, deletes, NVMe evictions) and is
always taken before `_lock`. I/O happens with neither held where possible.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import logging
import math
import os
import threading
import time
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from hstore.buffers import as_bytes, copy_bytes, cuda_available
from hstore.config import StoreConfig
from hstore.errors import (
    CapacityError,
    InvalidItemError,
    StoreClosedError,
    StoreConfigError,
    StoreIOError,
    StoreLockedError,
    TierFullError,
)
from hstore.index import Index, IndexEntry
from hstore.io import IoEngine, make_engine
from hstore.policy import make_admission_policy, make_eviction_policy, make_placement_policy
from hstore.record import DTYPE_TO_CODE, MAX_NDIM
from hstore.stats import StoreStats
from hstore.tiers.base import Location, ReadStatus, Tier, WriteItem
from hstore.tiers.memory import DramTier, GpuTier, MemoryTier
from hstore.tiers.nvme import NvmeTier

log = logging.getLogger(__name__)

_META_KEY = "layout"

# Stores not closed by their owner are closed (flushed) at interpreter exit, before the
# flusher, a daemon thread, is frozen mid-copy: that aborted the process and lost the data.
_open_stores: "weakref.WeakSet[TieredStore]" = weakref.WeakSet()


@atexit.register
def _close_open_stores() -> None:
    for store in list(_open_stores):
        try:
            store.close()
        except Exception:  # noqa: BLE001 - exiting anyway; say what happened
            log.exception("closing %s at exit failed", store.config.root)


def normalize_key(key: str | bytes) -> bytes:
    """Keys are bytes; str keys are UTF-8 encoded (so "a" and b"a" are the same key)."""
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise InvalidItemError(f"keys must be str or bytes, not {type(key).__name__}")


@dataclass(eq=False, slots=True)
class _Entry:
    """The store's view of one key: its metadata and the copy held by each tier."""

    key: bytes
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    seq: int
    cost: float | None = None
    gpu: Location | None = None
    dram: Location | None = None
    durable: Location | None = None  # the NVMe record the index points at
    dirty: bool = False  # the DRAM copy is newer than `durable` and must be flushed
    flushing: Location | None = None  # the DRAM copy the flusher is writing (pinned until it ends)
    ready: object = None  # CUDA event of a pending device-to-host copy into `dram`
    created: float = 0.0
    atime: float = 0.0
    hits: int = 0
    stats_changed: bool = False

    def has_copy(self) -> bool:
        return self.gpu is not None or self.dram is not None or self.durable is not None


@dataclass
class _DeferredUnpin:
    """Locations a non-blocking copy reads from; unpinned once `event` completes."""

    event: object
    locs: list[Location] = field(default_factory=list)


class TieredStore:
    """A tensor store over GPU memory, pinned host DRAM and NVMe.

    >>> with TieredStore(StoreConfig(root="/tmp/hs", nvme_bytes=1 << 30)) as store:
    ...     store.put("k", torch.ones(3))
    ...     store.get("k")
    """

    def __init__(self, config: StoreConfig | None = None, **overrides):
        if config is None:
            config = StoreConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a StoreConfig or keyword overrides, not both")
        self.config = config
        self._closed = True
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._index_lock = threading.Lock()
        self._entries: dict[bytes, _Entry] = {}
        self._dirty: dict[bytes, _Entry] = {}  # insertion order = flush order
        self._pins: Counter[Location] = Counter()
        self._pending_free: dict[Location, Tier] = {}
        self._deferred: list[_DeferredUnpin] = []
        self._seq = 0
        self._active = 0  # calls using tiers, engine or index outside the lock; close() waits for them
        self._stats = StoreStats()
        self._last_flush_error: BaseException | None = None
        self._d2h_streams: dict[int, object] = {}
        self._lock_fd = -1
        self._index: Index | None = None
        self._engine = None
        self._owns_engine = True
        self.gpu: GpuTier | None = None
        self.nvme: NvmeTier | None = None
        self.dram: DramTier | None = None
        self._flusher = None
        try:
            self._open()
        except BaseException:
            self._teardown()
            raise
        self._closed = False
        from hstore.flusher import Flusher

        if self.nvme is not None:
            self._flusher = Flusher(self)
            self._flusher.start()
        _open_stores.add(self)

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        cfg = self.config
        root = Path(cfg.root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreConfigError(f"cannot use {root} as the store root: {e.strerror or e}") from e
        self._lock_fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
            raise StoreLockedError(f"the store at {root} is open in another process (pid {holder or '?'})") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)

        self._index = Index(root / "index", map_size=cfg.index_map_bytes, sync=cfg.sync)
        dirs = [str(p.resolve()) for p in cfg.nvme_paths]
        meta = self._index.meta_get(_META_KEY)
        if meta is not None:
            saved = json.loads(meta)
            if saved["nvme_dirs"] and dirs and saved["nvme_dirs"] != dirs:
                raise StoreConfigError(
                    f"the store at {root} keeps its NVMe data in {saved['nvme_dirs']}, the config names {dirs}"
                )
            if saved["nvme_dirs"] and not dirs and len(self._index):
                raise StoreConfigError(
                    f"the store at {root} holds {len(self._index)} items on NVMe; open it with nvme_bytes > 0"
                )

        self._eviction = {name: self._make_eviction() for name in ("gpu", "dram", "nvme")}
        pin = cfg.pin_dram if cfg.pin_dram is not None else cuda_available()
        self.dram = DramTier(cfg.dram_bytes, pin=pin)
        if cfg.gpu_bytes:
            self.gpu = GpuTier(cfg.gpu_bytes, cfg.gpu_device)
        if dirs:
            self._admission = make_admission_policy(cfg.admission)
            if isinstance(cfg.io_engine, IoEngine):
                self._engine, self._owns_engine = cfg.io_engine, False
            else:
                self._engine = make_engine(cfg.io_engine, queue_depth=cfg.queue_depth, workers=cfg.io_threads)
            self.nvme = NvmeTier(
                cfg.nvme_paths, cfg.nvme_bytes, self._engine, make_placement_policy(cfg.placement),
                sync=cfg.sync, verify=cfg.verify_reads,
            )
            # Only now: a config whose NVMe tier cannot open must not claim the root.
            self._index.meta_put(_META_KEY, json.dumps({"format": 1, "nvme_dirs": dirs}).encode())
            self._load_index()

    def _make_eviction(self):
        spec = self.config.eviction
        if callable(spec) and not isinstance(spec, str):
            return spec()
        return make_eviction_policy(spec)

    def _load_index(self) -> None:
        """Rebuild the in-memory map and the NVMe free-space map from the durable index."""
        loaded, bad = [], []
        for ie in self._index.items():
            loc = Location("nvme", ie.device, ie.offset, ie.length, ie.nbytes, ie.checksum)
            consistent = (ie.nbytes == math.prod(ie.shape) * ie.dtype.itemsize
                          and loc.length == self.nvme.footprint(ie.nbytes))
            if not consistent or not self.nvme.reserve(loc):
                bad.append(ie.key)
                continue
            e = _Entry(ie.key, ie.dtype, ie.shape, ie.nbytes, 0, durable=loc,
                       created=ie.created, atime=ie.atime, hits=ie.hits)
            self._entries[ie.key] = e
            loaded.append(e)
        for e in sorted(loaded, key=lambda e: e.atime):
            self._eviction["nvme"].insert(e.key, e.durable.length, e.cost)
        if bad:
            log.warning("dropping %d index entries that are inconsistent, leave the NVMe files or overlap", len(bad))
            self._index.delete_many(bad)
        log.info("opened %s: %d items on NVMe", self.config.root, len(loaded))

    # ------------------------------------------------------------------ public API
    def put(self, key: str | bytes, tensor: torch.Tensor, *, cost: float | None = None, non_blocking: bool = False) -> None:
        """Store `tensor` under `key` (replacing any previous value). Returns once it is in DRAM.

        `cost` is an optional restore-cost hint for cost-aware eviction.
        `non_blocking=True` with a CUDA tensor copies to DRAM on a side stream
        and returns at once; the caller must not modify the tensor afterwards
        (its memory is kept alive by the store until the copy ends).
        """
        self.put_many([(key, tensor)], cost=cost, non_blocking=non_blocking)

    def put_many(
        self, items: Sequence[tuple[str | bytes, torch.Tensor]], *, cost: float | None = None, non_blocking: bool = False
    ) -> None:
        """`put` for many items at once: one side-stream switch and one event for all device copies.

        Items are validated before anything is stored; each is stored (or not)
        on its own, in order.
        """
        prepared = []
        for key, tensor in items:
            k = normalize_key(key)
            src = self._validate_tensor(tensor)
            nbytes = src.numel() * src.element_size()
            if self.dram.footprint(nbytes) > self.dram.capacity:
                raise CapacityError(
                    f"an item of {nbytes} bytes cannot fit the DRAM tier ({self.dram.capacity} bytes); raise dram_bytes"
                )
            prepared.append((k, src, nbytes))
        group, group_bytes = [], 0
        for item in prepared:  # groups well below DRAM capacity, so reserving a group never waits on itself
            if group and group_bytes + item[2] > self.dram.capacity // 4:
                self._put_group(group, cost, non_blocking)
                group, group_bytes = [], 0
            group.append(item)
            group_bytes += item[2]
        if group:
            self._put_group(group, cost, non_blocking)

    def _put_group(self, prepared: list, cost: float | None, non_blocking: bool) -> None:
        with self._operation():
            self._put_group_open(prepared, cost, non_blocking)

    def _put_group_open(self, prepared: list, cost: float | None, non_blocking: bool) -> None:
        locs: list[Location] = []
        try:
            for _, _, nbytes in prepared:
                locs.append(self._reserve_dram(nbytes))
            ready = self._copy_in([(self.dram.view(loc), src) for loc, (_, src, _) in zip(locs, prepared)], non_blocking)
        except BaseException:
            for loc in locs:
                self.dram.free(loc)
            raise
        now = time.time()
        with self._cv:
            if self._closed:
                for loc in locs:
                    self.dram.free(loc)
                raise StoreClosedError("the store is closed")
            st = self._stats
            for loc, (k, src, nbytes) in zip(locs, prepared):
                admitted = (
                    self.nvme is not None
                    and self.nvme.footprint(nbytes) <= self.nvme.capacity // 2
                    and self._admission.admit(k, nbytes, cost)
                )
                self._seq += 1
                e = _Entry(k, src.dtype, tuple(src.shape), nbytes, self._seq, cost, dram=loc, ready=ready,
                           dirty=admitted, created=now, atime=now)
                old = self._entries.get(k)
                if old is not None:
                    e.durable = old.durable  # still what the index holds, until `e` is flushed
                    self._drop_volatile(old)
                    if self._dirty.get(k) is old:
                        del self._dirty[k]
                self._entries[k] = e
                self._eviction["dram"].insert(k, loc.length, cost)
                if admitted:
                    self._dirty[k] = e
                st.puts += 1
                st.bytes_put += nbytes
                st.tier("dram").bytes_written += nbytes
            self._cv.notify_all()

    def get(self, key: str | bytes, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The tensor stored under `key` (a new tensor on `device`), or None on a miss."""
        return self.get_many([key], device=device)[0]

    def get_many(self, keys: Sequence[str | bytes], device: torch.device | str = "cpu") -> list[torch.Tensor | None]:
        """Batched `get`: NVMe reads for all keys are issued together."""
        device = torch.device(device)
        if device.type == "meta":
            raise InvalidItemError("cannot read into meta tensors: they hold no data")
        ks = [normalize_key(k) for k in keys]
        with self._operation():
            return self._get_many(ks, device)

    def _get_many(self, ks: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
        result: list[torch.Tensor | None] = [None] * len(ks)
        todo = list(range(len(ks)))
        while todo:  # again for keys overwritten with another dtype or shape while being read
            with self._lock:
                self._check_open()
                metas = [self._entries.get(ks[i]) for i in todo]
            outs = [torch.empty(e.shape, dtype=e.dtype, device=device) if e is not None else None for e in metas]
            present = [j for j, o in enumerate(outs) if o is not None]
            replaced: list[int] = []
            found = self._read_into([ks[todo[j]] for j in present], _BufferList([outs[j] for j in present]),
                                    expect=[metas[j] for j in present], replaced=replaced)
            for j, ok in zip(present, found):
                result[todo[j]] = outs[j] if ok else None
            missing = len(todo) - len(present)
            if missing:
                with self._lock:
                    self._stats.gets += missing
                    self._stats.misses += missing
                    for name in self._tier_names():
                        self._stats.tier(name).misses += missing
            todo = [todo[present[r]] for r in replaced]
        return result

    def get_into(self, key: str | bytes, out: torch.Tensor) -> bool:
        """Copy the value of `key` into `out` (same dtype and number of elements); False on a miss."""
        return self.get_many_into([key], [out])[0]

    def get_many_into(
        self,
        keys: Sequence[str | bytes],
        outs: Sequence[torch.Tensor],
        *,
        non_blocking: bool = False,
        promote: bool | None = None,
    ) -> list[bool]:
        """Read many items straight into preallocated buffers (pinned host or GPU).

        `outs` is a list of buffers, one per key, or one contiguous tensor whose
        rows (``outs[i]``) are the buffers: the cheap form for many keys, since
        no per-item view is made unless an item comes from NVMe.

        NVMe reads are issued as one batch and verified before this returns.
        Copies from memory tiers honour `non_blocking`: they are queued on the
        current CUDA stream and the source stays pinned until they complete, so
        the caller may synchronise the stream later. CPU-aligned outputs are
        filled by DMA with no bounce copy. `promote=None` follows the config.
        """
        if len(keys) != len(outs):
            raise ValueError("keys and outs must have the same length")
        ks = [normalize_key(k) for k in keys]
        rows = _StackedRows(outs) if isinstance(outs, torch.Tensor) else _BufferList(outs)
        with self._operation():
            return self._read_into(ks, rows, non_blocking=non_blocking, promote=promote)

    def locate(self, keys: Iterable[str | bytes]) -> list[str | None]:
        """The tier a read of each key would be served from ("gpu", "dram", "nvme") or None."""
        with self._lock:
            self._check_open()
            return [self._source(self._entries.get(normalize_key(k))) for k in keys]

    def __contains__(self, key: object) -> bool:
        try:
            k = normalize_key(key)  # type: ignore[arg-type]
        except InvalidItemError:
            return False
        with self._lock:
            self._check_open()
            return k in self._entries

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._entries)

    def keys(self) -> list[bytes]:
        with self._lock:
            self._check_open()
            return list(self._entries)

    def delete(self, key: str | bytes) -> bool:
        """Remove `key` from every tier (and the index). True if it was present."""
        k = normalize_key(key)
        with self._operation(), self._index_lock:
            with self._lock:
                e = self._entries.pop(k, None)
                if e is None:
                    return False
                self._stats.deletes += 1
                self._drop_volatile(e)
                if self._dirty.get(k) is e:
                    del self._dirty[k]
                dloc = e.durable
                self._eviction["nvme"].remove(k)
            if dloc is not None:
                self._index.delete_many([k])
                with self._lock:
                    e.durable = None
                    self._release(self.nvme, dloc)
        return True

    def drop_cached(self, keys: Iterable[str | bytes] | None = None) -> int:
        """Drop the GPU/DRAM copies of items that are durable on NVMe (all items when `keys` is None).

        Nothing is lost: later reads come from NVMe. Benchmarks use it to measure
        cold reads; callers can use it to make room ahead of a burst. Dirty items
        keep their DRAM copy (flush first to drop them too). Returns how many
        copies were dropped.
        """
        with self._lock:
            self._check_open()
            ks = list(self._entries) if keys is None else [normalize_key(k) for k in keys]
            dropped = 0
            for k in ks:
                e = self._entries.get(k)
                if e is None or e.durable is None or e.dirty:
                    continue
                for name in ("gpu", "dram"):
                    if getattr(e, name) is not None:
                        dropped += 1
                self._drop_volatile(e)
            return dropped

    def flush(self) -> None:
        """Return once everything put before this call is durable on NVMe.

        Raises StoreIOError if the flusher fails while this call waits. A store
        without an NVMe tier has nothing to flush.
        """
        if self.nvme is None:
            with self._lock:
                self._check_open()
            return
        with self._cv:
            self._check_open()
            target = self._seq
            failures = self._stats.flush_failures
            self._cv.notify_all()
            while True:
                oldest = next(iter(self._dirty.values()), None)
                if oldest is None or oldest.seq > target:
                    return
                if self._stats.flush_failures > failures:
                    raise StoreIOError(f"flush failed: {self._last_flush_error}", getattr(self._last_flush_error, "errno", 0) or 0)
                if not self._flusher.alive:  # waiting would be forever
                    raise StoreIOError(f"the flusher has stopped: {self._last_flush_error}")
                if self._closed:
                    raise StoreClosedError("the store was closed during flush")
                self._cv.wait(0.05)

    def stats(self) -> dict:
        """Counters (hits/misses per tier, bytes moved, evictions, corrupt chunks, ...) and occupancy."""
        with self._lock:
            snap = self._stats.snapshot()
            for name, tier in self._tiers():
                t = snap["tiers"].setdefault(name, {})
                t.update(capacity=tier.capacity, used=tier.used, items=len(self._eviction[name]))
            snap["items"] = len(self._entries)
            snap["dirty_items"] = len(self._dirty)
            snap["dirty_bytes"] = sum(e.nbytes for e in self._dirty.values())
            snap["io_engine"] = getattr(self._engine, "name", None)
            return snap

    def close(self) -> None:
        """Flush what is dirty (best effort), persist access statistics, release everything."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
            while self._active:  # calls already past their open check finish first
                self._cv.wait()
        if self._flusher is not None:
            self._flusher.stop()
        self._finish_deferred(wait=True)
        if self._index is not None and self.nvme is not None:
            changed = [self._index_entry(e, e.durable) for e in self._entries.values() if e.stats_changed and e.durable]
            try:
                self._index.put_many(changed)
            except StoreIOError as e:
                log.warning("could not persist access statistics: %s", e)
        self._teardown()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ reads
    def _read_into(self, ks, outs, *, non_blocking=False, promote=None, expect=None, replaced=None) -> list[bool]:
        """Read `ks` into `outs`. With `expect` (get_many: the entries the outputs were sized for),
        an entry replaced since by one of another dtype or shape is not read; its index goes to `replaced`."""
        promote = self.config.promote_on_hit if promote is None else promote
        n = len(ks)
        found = [False] * n
        plan: list[tuple[int, _Entry, str, Location]] = []
        now = time.time()
        with self._lock:
            self._check_open()
            self._finish_deferred(wait=False)
            entries = [self._entries.get(k) for k in ks]
            if expect is None:  # before anything is pinned (get_many sized its outputs itself)
                outs.check(entries)
            st = self._stats
            names = self._tier_names()
            tier_stats = [st.tier(name) for name in names]
            for i, e in enumerate(entries):
                if e is None or (expect is not None and e is not expect[i]):
                    if expect is None:  # get_many counts its own misses
                        st.gets += 1
                        st.misses += 1
                        for ts in tier_stats:
                            ts.misses += 1
                    elif e is None:
                        st.gets += 1
                        st.misses += 1
                    elif e.dtype != outs[i].dtype or e.shape != tuple(outs[i].shape):
                        replaced.append(i)  # get_many sizes a new buffer and reads again
                        continue
                    if e is None:
                        continue
                src = self._source(e)
                loc = getattr(e, "durable" if src == "nvme" else src)
                self._pins[loc] += 1
                plan.append((i, e, src, loc))
                self._eviction[src].access(ks[i])
                e.atime, e.hits, e.stats_changed = now, e.hits + 1, True
                st.gets += 1
                st.hits += 1
                for name, ts in zip(names, tier_stats):  # a miss in every tier above the one that served it
                    if name == src:
                        ts.hits += 1
                        ts.bytes_read += e.nbytes
                        break
                    ts.misses += 1

        mem = [p for p in plan if p[2] != "nvme"]
        disk = [p for p in plan if p[2] == "nvme"]
        deferred = _DeferredUnpin(None)
        try:
            for run in _adjacent_runs(mem, outs):
                for _, e, _, _ in run:
                    if e.ready is not None:  # a device-to-host put still copying into this slot
                        e.ready.synchronize()
                        e.ready = None
                src, first = run[0][2], run[0][3]
                nbytes = sum(p[3].nbytes for p in run)
                view = self._tier(src).view_range(first.offset, nbytes)
                ob = outs.span(run[0][0], nbytes)
                nb = non_blocking and (ob.is_cuda or view.is_cuda)
                copy_bytes(ob, view, non_blocking=nb)
                for i, _, _, loc in run:
                    found[i] = True
                    if nb:
                        deferred.locs.append(loc)
            if deferred.locs:
                deferred.event = torch.cuda.Event()
                deferred.event.record()
            if disk:
                statuses = self.nvme.read_many([e.key for _, e, _, _ in disk], [loc for *_, loc in disk],
                                               [outs[i] for i, *_ in disk])
                for (i, e, _, loc), status in zip(disk, statuses):
                    if status == ReadStatus.OK:
                        found[i] = True
                    else:
                        self._on_bad_read(e, loc, status)
        finally:
            with self._lock:
                held = {id(loc) for loc in deferred.locs}  # unpinned once their copies have run
                for i, e, src, loc in plan:
                    if id(loc) not in held:
                        self._unpin(loc)
                if deferred.locs:
                    self._deferred.append(deferred)
        if promote:
            for i, e, src, loc in plan:
                if not found[i]:
                    continue
                if src == "nvme":
                    self._promote(e, "dram", outs[i])
                if self.gpu is not None and src != "gpu" and outs[i].device.type == self.gpu.device.type:
                    self._promote(e, "gpu", outs[i])
        return found

    def _on_bad_read(self, e: _Entry, loc: Location, status: ReadStatus) -> None:
        """A corrupt or failed NVMe read: count it, log it, and drop the record (it becomes a miss)."""
        with self._lock:
            st = self._stats
            if status == ReadStatus.CORRUPT:
                st.corrupt_chunks += 1
            else:
                st.io_errors += 1
            # _read_into counted an NVMe hit when it planned the read: it was a miss
            nvme = st.tier("nvme")
            st.hits, st.misses = st.hits - 1, st.misses + 1
            nvme.hits, nvme.misses, nvme.bytes_read = nvme.hits - 1, nvme.misses + 1, nvme.bytes_read - e.nbytes
        log.error("%s chunk for key %r at nvme device %d offset %d: dropped",
                  "corrupt" if status == ReadStatus.CORRUPT else "unreadable", e.key[:80], loc.device, loc.offset)
        with self._index_lock:
            with self._lock:
                holders = self._holders(e, loc)
                if not holders:
                    return
            self._index.delete_many([e.key])
            with self._lock:
                for h in holders:
                    h.durable = None
                self._release(self.nvme, loc)
                self._forget_if_empty(e.key)

    def _promote(self, e: _Entry, tier_name: str, src: torch.Tensor) -> None:
        """Copy a just-read item into a faster tier if room can be made without waiting."""
        tier = self._tier(tier_name)
        if tier.footprint(e.nbytes) > tier.capacity:
            return  # can never fit (allocate would raise CapacityError): served from where it is
        with self._lock:
            if self._closed or self._entries.get(e.key) is not e or getattr(e, tier_name) is not None:
                return
            loc = self._allocate_evicting(tier, e.nbytes)
            if loc is None:
                return
            self._pins[loc] += 1
        copy_bytes(tier.view(loc), as_bytes(src))
        with self._lock:
            self._unpin(loc)
            if self._entries.get(e.key) is e and getattr(e, tier_name) is None and not self._closed:
                setattr(e, tier_name, loc)
                self._eviction[tier_name].insert(e.key, loc.length, e.cost)
                ts = self._stats.tier(tier_name)
                ts.promotions += 1
                ts.bytes_written += e.nbytes
            else:
                tier.free(loc)

    # ------------------------------------------------------------------ writes
    def _validate_tensor(self, tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise InvalidItemError(f"values must be torch.Tensor, not {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise InvalidItemError(f"only dense tensors can be stored, not {tensor.layout}")
        if tensor.device.type == "meta":
            raise InvalidItemError("meta tensors hold no data")
        if tensor.dtype not in DTYPE_TO_CODE:
            raise InvalidItemError(f"dtype {tensor.dtype} cannot be stored")
        if tensor.dim() > MAX_NDIM:
            raise InvalidItemError(f"tensors of more than {MAX_NDIM} dimensions cannot be stored")
        t = tensor.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        return t if t.is_contiguous() else t.contiguous()

    def _copy_in(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], non_blocking: bool):
        """Copy sources into DRAM slots; returns a CUDA event when device copies are still in flight."""
        stream = None
        for dst, src in pairs:
            src_b = as_bytes(src)
            if not (non_blocking and src.is_cuda and self.dram.pinned):
                copy_bytes(dst, src_b)
                continue
            if stream is None:
                stream = self._d2h_streams.get(src.device.index)
                if stream is None:
                    stream = self._d2h_streams[src.device.index] = torch.cuda.Stream(device=src.device)
                stream.wait_stream(torch.cuda.current_stream(src.device))
            with torch.cuda.stream(stream):
                dst.copy_(src_b, non_blocking=True)
            src_b.record_stream(stream)  # the allocator must not reuse the source before the copy ran
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _reserve_dram(self, nbytes: int) -> Location:
        """A DRAM slot for a put: evict clean items, else wait for the flusher (backpressure)."""
        deadline = time.monotonic() + self.config.put_timeout_s
        failures = self._stats.flush_failures
        with self._cv:
            while True:
                self._check_open()
                self._finish_deferred(wait=False)
                loc = self._allocate_evicting(self.dram, nbytes)
                if loc is not None:
                    return loc
                flusher_dead = self._flusher is not None and not self._flusher.alive
                if (self._stats.flush_failures > failures or flusher_dead) and self._last_flush_error is not None:
                    raise StoreIOError(
                        f"DRAM is full of unflushed data and the flusher is failing: {self._last_flush_error}",
                        getattr(self._last_flush_error, "errno", 0) or 0,
                    )
                if time.monotonic() > deadline:
                    raise TierFullError(
                        f"DRAM tier full: no clean item to evict within {self.config.put_timeout_s}s "
                        f"({len(self._dirty)} items wait to be flushed)"
                    )
                self._cv.notify_all()
                self._cv.wait(0.05)

    # ------------------------------------------------------------------ eviction (called with _lock held)
    def _allocate_evicting(self, tier: MemoryTier, nbytes: int) -> Location | None:
        while True:
            loc = tier.allocate(nbytes)
            if loc is not None or not self._evict_one(tier.name):
                return loc

    def _evict_one(self, tier_name: str) -> bool:
        """Evict one item's copy from a memory tier; False when nothing can be evicted now."""
        policy = self._eviction[tier_name]

        def unevictable(k: bytes) -> bool:
            e = self._entries.get(k)
            if e is None:
                return False
            loc = getattr(e, tier_name)
            return loc is None or loc in self._pins or (tier_name == "dram" and (e.dirty or e.ready is not None and not e.ready.query()))

        victim = policy.pop_victim(skip=unevictable)
        if victim is None:
            return False
        e = self._entries.get(victim)
        loc = getattr(e, tier_name) if e is not None else None
        if loc is None:
            return True  # a stale policy entry; try again
        stats = self._stats.tier(tier_name)
        stats.evictions += 1
        setattr(e, tier_name, None)
        if tier_name == "gpu" and not e.has_copy() and self._demote_to_dram(e, loc):
            stats.demotions += 1
        self._tier(tier_name).free(loc)
        self._forget_if_empty(victim)
        return True

    def _demote_to_dram(self, e: _Entry, gpu_loc: Location) -> bool:
        """Write-back of a GPU item that has no other copy (instead of losing it)."""
        loc = self._allocate_evicting(self.dram, e.nbytes)
        if loc is None:
            return False
        copy_bytes(self.dram.view(loc), self.gpu.view(gpu_loc))
        e.dram = loc
        self._eviction["dram"].insert(e.key, loc.length, e.cost)
        admitted = self.nvme is not None and self.nvme.footprint(e.nbytes) <= self.nvme.capacity // 2
        if admitted and self._dirty.get(e.key) is None:
            e.dirty = True
            self._dirty[e.key] = e
            self._cv.notify_all()
        return True

    def _forget_if_empty(self, key: bytes) -> None:
        e = self._entries.get(key)
        if e is not None and not e.has_copy() and not e.dirty:
            del self._entries[key]
            self._stats.dropped += 1
            for p in self._eviction.values():
                p.remove(key)

    def _drop_volatile(self, e: _Entry) -> None:
        """Release an entry's GPU and DRAM copies (deferred while readers hold them)."""
        for name in ("gpu", "dram"):
            loc = getattr(e, name)
            if loc is not None:
                setattr(e, name, None)
                self._eviction[name].remove(e.key)
                self._release(self._tier(name), loc)

    # ------------------------------------------------------------------ flusher interface
    def _take_dirty_batch(self, max_bytes: int) -> list[_Entry]:
        """Dirty entries to flush next (pinned), oldest first; waits briefly when there are none."""
        with self._cv:
            if not self._dirty and not self._closed:
                self._cv.wait(0.1)
            batch, total = [], 0
            for e in self._dirty.values():
                if e.flushing:
                    continue
                if batch and total + e.nbytes > max_bytes:
                    break
                batch.append(e)
                total += e.nbytes
                e.flushing = e.dram
                self._pins[e.dram] += 1
            return batch

    def _write_batch(self, batch: list[_Entry]) -> list[Location]:
        """Write a batch to NVMe, evicting NVMe items when it is full."""
        for e in batch:
            if e.ready is not None:
                e.ready.synchronize()
        # e.flushing, not e.dram: an overwrite or delete may drop e's DRAM copy meanwhile (it stays pinned).
        items = [WriteItem(e.key, self.dram.view(e.flushing), e.dtype, e.shape) for e in batch]
        while True:
            try:
                return self.nvme.write_many(items)
            except TierFullError:
                need = sum(self.nvme.footprint(e.nbytes) for e in batch)
                if not self._evict_nvme(need):
                    raise

    def _evict_nvme(self, need: int) -> bool:
        with self._index_lock:
            with self._lock:
                victims, freed = [], 0
                policy = self._eviction["nvme"]
                while freed < need:
                    k = policy.pop_victim(skip=lambda k: (e := self._entries.get(k)) is None or e.durable is None or e.durable in self._pins)
                    if k is None:
                        break
                    e = self._entries[k]
                    victims.append((e, e.durable))
                    freed += e.durable.length
                if not victims:
                    return False
            self._index.delete_many([e.key for e, _ in victims])
            with self._lock:
                for e, loc in victims:
                    for h in self._holders(e, loc):
                        h.durable = None
                    self._release(self.nvme, loc)
                    self._stats.tier("nvme").evictions += 1
                    self._forget_if_empty(e.key)
        return True

    def _publish(self, batch: list[_Entry], locs: list[Location]) -> None:
        """Index a written batch (the data is durable already), then mark the entries clean."""
        with self._index_lock:
            with self._lock:
                current = [(e, loc) for e, loc in zip(batch, locs) if self._entries.get(e.key) is e]
                stale = [loc for e, loc in zip(batch, locs) if self._entries.get(e.key) is not e]
            try:
                self._index.put_many([self._index_entry(e, loc) for e, loc in current])
            except BaseException:
                with self._lock:
                    for loc in locs:
                        self.nvme.free(loc)
                raise
            with self._cv:
                for e, loc in current:
                    prev = e.durable
                    # also a newer entry put meanwhile: it inherited `prev` as "what the index holds"
                    for h in self._holders(e, prev):
                        h.durable = loc
                    e.durable = loc
                    if prev is not None:
                        self._release(self.nvme, prev)
                    e.dirty = False
                    if self._dirty.get(e.key) is e:
                        del self._dirty[e.key]
                    self._eviction["nvme"].insert(e.key, loc.length, e.cost)
                    self._stats.tier("nvme").bytes_written += e.nbytes
                    self._stats.bytes_flushed += e.nbytes
                for loc in stale:
                    self.nvme.free(loc)
                self._stats.flushes += 1
                self._end_flush(batch)

    def _abort_flush(self, batch: list[_Entry], error: BaseException) -> None:
        with self._cv:
            self._stats.flush_failures += 1
            self._last_flush_error = error
            self._end_flush(batch)

    def _end_flush(self, batch: list[_Entry]) -> None:
        for e in batch:
            if e.flushing is not None:
                self._unpin(e.flushing)
                e.flushing = None
        self._cv.notify_all()

    # ------------------------------------------------------------------ helpers
    def _holders(self, e: _Entry, loc: Location) -> list[_Entry]:
        """Entries (the given one and the key's current one) whose durable copy is `loc`."""
        cur = self._entries.get(e.key)
        return [h for h in {id(e): e, id(cur): cur}.values() if h is not None and h.durable is loc]

    def _release(self, tier: Tier, loc: Location) -> None:
        if self._pins.get(loc):
            self._pending_free[loc] = tier
        else:
            tier.free(loc)

    def _unpin(self, loc: Location) -> None:
        self._pins[loc] -= 1
        if self._pins[loc] <= 0:
            del self._pins[loc]
            tier = self._pending_free.pop(loc, None)
            if tier is not None:
                tier.free(loc)

    def _finish_deferred(self, *, wait: bool) -> None:
        with self._lock:
            keep = []
            for d in self._deferred:
                if wait:
                    d.event.synchronize()
                if wait or d.event.query():
                    for loc in d.locs:
                        self._unpin(loc)
                else:
                    keep.append(d)
            self._deferred = keep

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    @contextmanager
    def _operation(self):
        """A public call that uses tiers, the engine or the index outside the lock: close()
        waits for it rather than closing files, rings and the index under it."""
        with self._lock:
            self._check_open()
            self._active += 1
        try:
            yield
        finally:
            with self._cv:
                self._active -= 1
                if not self._active:
                    self._cv.notify_all()

    def _source(self, e: _Entry | None) -> str | None:
        if e is None:
            return None
        if e.gpu is not None:
            return "gpu"
        if e.dram is not None:
            return "dram"
        return "nvme" if e.durable is not None else None

    def _tier(self, name: str) -> Tier:
        return {"gpu": self.gpu, "dram": self.dram, "nvme": self.nvme}[name]

    def _tiers(self) -> list[tuple[str, Tier]]:
        return [(n, t) for n, t in (("gpu", self.gpu), ("dram", self.dram), ("nvme", self.nvme)) if t is not None]

    def _tier_names(self) -> list[str]:
        return [n for n, _ in self._tiers()]

    def _index_entry(self, e: _Entry, loc: Location) -> IndexEntry:
        return IndexEntry(e.key, loc.device, loc.offset, loc.length, loc.nbytes, e.dtype, e.shape,
                          loc.checksum, e.created, e.atime, e.hits)

    def _teardown(self) -> None:
        for tier in (self.gpu, self.dram, self.nvme):
            if tier is not None:
                tier.close()
        if self._engine is not None and self._owns_engine:
            self._engine.close()
        if self._index is not None:
            self._index.close()
            self._index = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # also releases the flock
            self._lock_fd = -1


def _adjacent_runs(plan: list, outs: "_BufferList | _StackedRows") -> list[list]:
    """Group planned memory-tier reads whose sources and destinations are both back to back.

    A layer's chunks are put together and so usually lie side by side in the
    arena; so do the caller's per-chunk output views of one buffer. Each run is
    then one large copy (one DMA to the GPU) instead of one small copy per chunk.
    """
    runs: list[list] = []
    prev = None
    for p in plan:
        i, _, src, loc = p
        if prev is not None:
            pi, _, psrc, ploc = prev
            if src == psrc and loc.offset == ploc.offset + ploc.nbytes and outs.follows(pi, i, ploc.nbytes):
                runs[-1].append(p)
                prev = p
                continue
        runs.append([p])
        prev = p
    return runs


class _BufferList:
    """get_many_into's outputs as a list of tensors, one per key."""

    def __init__(self, outs: Sequence[torch.Tensor]):
        self.outs = list(outs)

    def __len__(self) -> int:
        return len(self.outs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.outs[i]

    def check(self, entries) -> None:
        for e, out in zip(entries, self.outs):
            if e is None:
                continue
            if not isinstance(out, torch.Tensor) or not out.is_contiguous() or out.device.type == "meta":
                raise InvalidItemError("output buffers must be contiguous tensors that hold data (not meta)")
            if out.dtype != e.dtype or out.numel() * out.element_size() != e.nbytes:
                raise InvalidItemError(
                    f"output buffer {out.dtype}{tuple(out.shape)} does not match the item {e.dtype}{e.shape}"
                )

    def follows(self, prev: int, i: int, prev_nbytes: int) -> bool:
        """Output i starts right where output `prev` (of `prev_nbytes`) ends, in the same allocation."""
        po, o = self.outs[prev], self.outs[i]
        return (o.device == po.device and o.data_ptr() == po.data_ptr() + prev_nbytes
                and o.untyped_storage().data_ptr() == po.untyped_storage().data_ptr())

    def span(self, i: int, nbytes: int) -> torch.Tensor:
        """`nbytes` of output i's storage as a flat uint8 tensor, starting where output i starts."""
        out = self.outs[i]
        if nbytes == out.numel() * out.element_size():
            return as_bytes(out)
        storage = out.untyped_storage()
        start = out.data_ptr() - storage.data_ptr()
        return torch.empty(0, dtype=torch.uint8, device=out.device).set_(storage, start, (nbytes,), (1,))


class _StackedRows:
    """One contiguous output tensor whose rows receive one item each (see `get_many_into`)."""

    def __init__(self, out: torch.Tensor):
        if out.dim() < 1 or not out.is_contiguous() or out.device.type == "meta":
            raise InvalidItemError("a stacked output must be a contiguous tensor with one row per key (not meta)")
        self.out = out
        self.dtype = out.dtype
        self.row_bytes = (out[0].numel() if out.shape[0] else 0) * out.element_size()
        self.row_shape = tuple(out.shape[1:])
        self._flat = as_bytes(out)

    def __len__(self) -> int:
        return self.out.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.out[i]

    def check(self, entries) -> None:
        for e in entries:
            if e is not None and (e.dtype != self.dtype or e.nbytes != self.row_bytes):
                raise InvalidItemError(
                    f"output rows {self.dtype}{self.row_shape} do not match the item {e.dtype}{e.shape}")

    def follows(self, prev: int, i: int, prev_nbytes: int) -> bool:
        return i == prev + 1  # rows are back to back, and each holds exactly its item (checked)

    def span(self, i: int, nbytes: int) -> torch.Tensor:
        """`nbytes` of the output as flat bytes, from the start of row i."""
        return self._flat.narrow(0, i * self.row_bytes, nbytes)

"""TieredStore: a dict-like store of tensors over GPU, host-DRAM, NVMe and (optionally) remote tiers.

The store is the front: it composes the parts and owns no tier-specific rule (navy's
hybrid cache). Its promises (docs/guarantees.md has them all):

* `put` lands in DRAM and returns; the flusher writes batches to NVMe and the remote
  tier (two-stage saving). A value's DRAM copy is never dropped before it is written,
  unless it is memory-only (the NVMe tier declined it): `flush()` says which values are.
* Reads look in GPU, DRAM, NVMe, then the remote tier, and promote what they find.
* The LMDB index is written only after the data it points at is durable, and every NVMe
  read is checked against its record: after a crash a key is served exactly as put, or
  it is a miss.

The parts: `Catalog` (entries, copies, dirty queue, pins; the lock order), `TierLadder`
(the tiers in read order; eviction, demotion, promotion), `Writer` (the write path),
`readpath` (the read path), `Flusher` (the second stage), `opening` (lock, layout, index).
"""
from __future__ import annotations

import atexit
import logging
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from hstore.buffers import cuda_available
from hstore.catalog import Catalog
from hstore.entry import index_entry
from hstore.config import StoreConfig
from hstore.errors import HStoreError, InvalidItemError, StoreConfigError, StoreIOError
from hstore.flusher import Flusher
from hstore.foreground import BackgroundGate, Hold
from hstore.index import Index, IndexEntry
from hstore.io import IoEngine, make_engine
from hstore.ladder import TierLadder, TierView
from hstore.lease import ReadLease
from hstore.opening import RootLock, check_layout, durable_entries, open_index, record_layout
from hstore.policy import EvictionPolicy, make_admission_policy, make_eviction_policy, make_placement_policy
from hstore.readpath import Reader, output_device
from hstore.recovery import RecoveryReport, rebuild_index
from hstore.stats import StoreStats
from hstore.tiers.base import RemoteTier
from hstore.tiers.memory import DramTier, GpuTier
from hstore.tiers.nvme import NvmeTier
from hstore.writepath import Writer, normalize_key, normalize_keys

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class FlushResult:
    """What `flush()` promises: every value put before it is durable, except `memory_only`.

    `memory_only` lists the keys, put before the call and still held, that the durable tier
    will never hold (its admission policy declined them, or they are larger than any of its
    devices): they live in memory only and are gone after a restart. A store without a
    durable tier (`durable` False) makes nothing durable and lists nothing here.
    """

    memory_only: tuple[bytes, ...] = ()
    durable: bool = True


@dataclass(frozen=True)
class DurableRecord:
    """Where the index says one key's record lies (`store.durable_record`)."""

    key: bytes
    path: Path
    offset: int
    length: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class TieredStore:
    """A tensor store over GPU memory, pinned host DRAM, NVMe and a shared remote tier.

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
        self.recovery: RecoveryReport | None = None
        """What rebuilding the index found, when this open rebuilt it (recover_index=True)."""
        self._lock: RootLock | None = None
        self._index: Index | None = None
        self._engine: IoEngine | None = None
        self._owns_engine = True
        self._tiers: list = []
        self._remote: RemoteTier | None = None
        self._owns_remote = False
        self._flusher: Flusher | None = None
        self._gate = BackgroundGate(config.background_max_hold_s)
        self._catalog: Catalog | None = None
        try:
            self._open()
        except BaseException:
            self._teardown()
            raise
        _open_stores.add(self)

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        cfg = self.config
        root = Path(cfg.root)
        self._lock = RootLock(root)
        dirs = [str(p.resolve()) for p in cfg.nvme_paths]
        self._index, self.recovery = open_index(root, dirs, map_size=cfg.index_map_bytes, sync=cfg.sync,
                                                recover=cfg.recover_index)
        check_layout(self._index, root, dirs)
        self._remote, self._owns_remote = _open_remote(cfg.remote)
        stats = StoreStats()
        pin = cfg.pin_dram if cfg.pin_dram is not None else cuda_available()
        if cfg.gpu_bytes:
            self._tiers.append(GpuTier(cfg.gpu_bytes, cfg.gpu_device))
        self._tiers.append(DramTier(cfg.dram_bytes, pin=pin))
        nvme = None
        if dirs:
            if isinstance(cfg.io_engine, IoEngine):
                self._engine, self._owns_engine = cfg.io_engine, False
            else:
                self._engine = make_engine(cfg.io_engine, queue_depth=cfg.queue_depth, workers=cfg.io_threads)
            nvme = NvmeTier(cfg.nvme_paths, cfg.nvme_bytes, self._engine, make_placement_policy(cfg.placement),
                            sync=cfg.sync, verify=cfg.verify_reads)
            self._tiers.append(nvme)
            # Only now: a config whose NVMe tier cannot open must not claim the root.
            record_layout(self._index, root, dirs)
            if self.recovery is not None:
                rebuild_index(self._index, nvme, self.recovery)
        self._ladder = ladder = TierLadder(self._tiers, stats, remote=self._remote)
        policies = [self._make_eviction() for _ in ladder.rungs]
        self._catalog = cat = Catalog(policies, landing=ladder.landing.index,
                                      durable=ladder.durable.index if ladder.durable else None,
                                      free=ladder.free, view=ladder.view, index=self._index, stats=stats)
        ladder.attach(cat)
        if nvme is not None:
            cat.load_indexed(durable_entries(self._index, nvme))
            log.info("opened %s: %d items on NVMe", root, len(cat.indexed))
        if nvme is not None or self._remote is not None:
            self._flusher = Flusher(cat, durable=nvme, remote=self._remote, make_room=cat.evict_durable,
                                    batch_bytes=cfg.flush_batch_bytes, gate=self._gate)
        admission = make_admission_policy(cfg.admission) if nvme is not None else None
        self._writer = Writer(cat, ladder, admission, put_timeout_s=cfg.put_timeout_s,
                              flusher_alive=self._flusher_alive, remote=self._remote is not None, gate=self._gate)
        self._reader = Reader(cat, ladder, promote_on_hit=cfg.promote_on_hit)
        if self._flusher is not None:
            self._flusher.start()

    def _make_eviction(self):
        spec = self.config.eviction
        if callable(spec) and not isinstance(spec, str):
            policy = spec()
            if not isinstance(policy, EvictionPolicy):
                raise StoreConfigError(f"the eviction factory returned {policy!r}, not an EvictionPolicy")
            return policy
        return make_eviction_policy(spec)

    def _flusher_alive(self) -> bool:
        return self._flusher is None or self._flusher.alive

    # ------------------------------------------------------------------ writes
    def put(self, key: str | bytes, tensor: torch.Tensor, *, cost: float | None = None,
            non_blocking: bool = False) -> None:
        """Store `tensor` under `key` (replacing any previous value). Returns once it is in DRAM.

        `cost` is an optional restore-cost hint for cost-aware eviction (checked by every
        tier's policy first: a refused hint raises InvalidItemError and nothing changes).
        `non_blocking=True` with a CUDA tensor copies to DRAM on a side stream and returns at
        once; the caller must not modify the tensor afterwards.
        """
        self.put_many([(key, tensor)], cost=cost, non_blocking=non_blocking)

    def put_many(self, items: Sequence[tuple[str | bytes, torch.Tensor]], *, cost: float | None = None,
                 non_blocking: bool = False) -> None:
        """`put` for many items at once: one side-stream switch and one event for all device copies.

        Every item is validated before anything is stored. Items are stored in order, in
        groups of up to a quarter of DRAM: if a group fails (TierFullError, StoreIOError),
        the groups before it are stored and nothing of it or after it.
        """
        writer = self._writer
        prepared = writer.prepare(items, cost)
        for group in writer.groups(prepared):
            writer.put_group(group, cost, non_blocking)

    def delete(self, key: str | bytes) -> bool:
        """Remove `key` from every tier (the index, and the remote tier too). True if it was present locally."""
        k = normalize_key(key)
        cat = self._catalog
        with cat.operation():
            with cat.commit_lock:  # no flusher commit of a new put of k between the removal and the index drop
                with cat.lock:
                    e = cat.remove_locked(k)
                    if e is not None:
                        cat.stats.deletes += 1
                cat.drop_indexed_committing([k])
            if self._remote is not None:
                self._reader.delete_remote([k])
        return e is not None

    def drop_cached(self, keys: Iterable[str | bytes] | None = None) -> int:
        """Drop the GPU/DRAM copies of items that are durable on NVMe (all items when `keys` is None).

        Nothing is lost: later reads come from NVMe. Items not yet written (or memory-only)
        keep their copies. Returns how many copies were dropped.
        """
        cat = self._catalog
        d = cat.durable
        with cat.lock:
            cat.check_open()
            ks = list(cat.entries) if keys is None else normalize_keys(keys)
            dropped = 0
            for k in ks:
                e = cat.entries.get(k)
                if e is None or d is None or e.copies[d] is None or e.pending:
                    continue
                dropped += sum(loc is not None for r, loc in enumerate(e.copies) if r != d)
                cat.drop_volatile_locked(e)
            return dropped

    def hold_background(self) -> Hold:
        """Hold the flusher back while latency-critical work runs (a restore, a first forward): it starts
        no new batch until `release()` (or the end of a `with` block), waiting at most
        `config.background_max_hold_s` before each batch. `flush()` and puts waiting for room override it."""
        return self._gate.hold()

    @property
    def background_held(self) -> int:
        """Holds on the flusher in force now."""
        return self._gate.held

    @property
    def background_deferrals(self) -> int:
        """Batches the flusher started late because of a hold, since the store opened."""
        return self._gate.deferred

    def flush(self) -> FlushResult:
        """Return once everything put before this call is written: on NVMe (durable) and, while it
        is reachable, on the remote tier. Values that will never be durable are listed in the
        result (`FlushResult.memory_only`).

        Raises StoreIOError if the flusher fails while this call waits.
        """
        cat = self._catalog
        with cat.lock:
            cat.check_open()
            target = cat.seq
        if self._flusher is not None:
            with self._gate.urgent():  # durability asked for: holds on the flusher no longer apply
                cat.wait_written(target, self._flusher_alive)
        if self._ladder.durable is None:
            return FlushResult((), durable=False)
        return FlushResult(cat.memory_only_keys(target))

    # ------------------------------------------------------------------ reads
    def get(self, key: str | bytes, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The tensor stored under `key` (a new tensor on `device`), or None on a miss."""
        return self.get_many([key], device=device)[0]

    def get_many(self, keys: Sequence[str | bytes], device: torch.device | str = "cpu") -> list[torch.Tensor | None]:
        """Batched `get`: the reads of every tier for all keys are issued together."""
        dev = output_device(device)
        ks = normalize_keys(keys)
        with self._catalog.operation():
            return self._reader.get_many(ks, dev)

    def get_into(self, key: str | bytes, out: torch.Tensor) -> bool:
        """Copy the value of `key` into `out` (same dtype and number of elements); False on a miss."""
        return self.get_many_into([key], [out])[0]

    def get_many_into(self, keys: Sequence[str | bytes], outs: Sequence[torch.Tensor] | torch.Tensor, *,
                      non_blocking: bool = False, promote: bool | None = None) -> list[bool]:
        """Read many items straight into preallocated buffers (pinned host or GPU).

        `outs` is a list of buffers, one per key, or one contiguous tensor whose rows
        (``outs[i]``) are the buffers: the cheap form for many keys. NVMe and remote reads
        are issued as one batch each and verified before this returns. Copies from memory
        tiers honour `non_blocking`: they are queued on the current CUDA stream and their
        sources stay pinned until they complete. `promote=None` follows the config.
        """
        if len(keys) != len(outs):
            raise ValueError("keys and outs must have the same length")
        ks = normalize_keys(keys)
        with self._catalog.operation():
            return self._reader.read_into(ks, outs, non_blocking=non_blocking, promote=promote)

    def lease(self, keys: Sequence[str | bytes]) -> ReadLease:
        """Pin the memory-tier copies of `keys` for many cheap `read_into(start, stop, out)` calls.

        The per-key work of a read (lookup, pin, policy, counters) is done once here instead
        of on every call: what lets a restore copy a layer's chunks with no per-chunk host
        time. Keys not held in a memory tier have `found[i]` False. See `hstore.lease`.
        """
        return ReadLease(self._catalog, self._ladder, normalize_keys(keys))

    def locate(self, keys: Iterable[str | bytes]) -> list[str | None]:
        """The tier a read of each key would be served from ("gpu", "dram", "nvme", "remote") or None."""
        return self._reader.locate(normalize_keys(keys))

    def __contains__(self, key: object) -> bool:
        try:
            k = normalize_key(key)  # type: ignore[arg-type]
        except InvalidItemError:
            return False
        return self._reader.locate([k])[0] is not None

    def __len__(self) -> int:
        """Items held locally (a remote tier's keys are not counted: they cannot be listed)."""
        with self._catalog.lock:
            self._catalog.check_open()
            return len(self._catalog.entries)

    def keys(self) -> list[bytes]:
        """Keys held locally."""
        with self._catalog.lock:
            self._catalog.check_open()
            return list(self._catalog.entries)

    # ------------------------------------------------------------------ what callers may look at
    @property
    def tiers(self) -> tuple[TierView, ...]:
        """The tiers in read order (GPU, DRAM, NVMe, remote; those configured), described read-only."""
        return self._ladder.describe()

    def tier(self, name: str) -> TierView | None:
        """The tier called `name` ("gpu", "dram", "nvme", "remote"), or None when the store has none."""
        return next((t for t in self.tiers if t.name == name), None)

    def durable_entries(self) -> list[IndexEntry]:
        """Every entry of the durable index (a consistent snapshot), as the index holds it."""
        with self._catalog.operation():
            return list(self._index.items()) if self._ladder.durable is not None else []

    def durable_record(self, key: str | bytes) -> DurableRecord | None:
        """Where the index says `key`'s record lies on NVMe (for tools and tests), or None."""
        k = normalize_key(key)
        cat = self._catalog
        with cat.lock:
            cat.check_open()
            loc = cat.indexed.get(k)
            e = cat.entries.get(k)
        if loc is None:
            return None
        ie = self._index.get(k)
        dtype, shape = (ie.dtype, ie.shape) if ie is not None else (e.dtype, e.shape)
        return DurableRecord(k, self._ladder.durable.tier.paths[loc.device], loc.offset, loc.length, loc.nbytes,
                             dtype, shape)

    def verify_durable(self, entries: Sequence[IndexEntry], batch_bytes: int):
        """Read back `entries` (from `durable_entries`) through the NVMe tier without serving or
        dropping anything: yields (entry, ReadStatus) in (device, offset) order."""
        from hstore.scrub import verify_records

        with self._catalog.operation():
            yield from verify_records(self._ladder.durable.tier, entries, batch_bytes)

    def stats(self) -> dict:
        """Counters (hits/misses per tier, bytes moved, evictions, corrupt chunks, memory-only, ...) and occupancy."""
        cat = self._catalog
        with cat.lock:
            snap = cat.stats.snapshot()
            for name, occ in self._ladder.occupancy().items():
                snap["tiers"].setdefault(name, {}).update(occ)
            snap["items"] = len(cat.entries)
            snap["dirty_items"] = len(cat.dirty)
            snap["dirty_bytes"] = sum(e.nbytes for e in cat.dirty.values())
            snap["memory_only_items"] = len(cat.memory_only)
            snap["memory_only_bytes"] = sum(e.nbytes for e in cat.memory_only.values())
            snap["io_engine"] = getattr(self._engine, "name", None)
        if self._remote is not None:  # the store's own counts, then what only the tier knows (errors, latency)
            try:
                own = self._remote.stats()
            except Exception as e:  # noqa: BLE001 - stats must not fail because a server is away
                log.warning("remote tier stats failed: %s", e)
                own = {}
            t = snap["tiers"].setdefault(self._remote.name, {})
            for k, v in own.items():
                t.setdefault(k, v)
        return snap

    # ------------------------------------------------------------------ deprecated tier attributes
    def _deprecated_tier(self, name: str):
        warnings.warn(f"TieredStore.{name} is deprecated: use store.tier({name!r}) (a read-only TierView)",
                      DeprecationWarning, stacklevel=3)
        rung = self._ladder.rung(name)
        return rung.tier if rung is not None else None

    @property
    def gpu(self):
        return self._deprecated_tier("gpu")

    @property
    def dram(self):
        return self._deprecated_tier("dram")

    @property
    def nvme(self):
        return self._deprecated_tier("nvme")

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Flush what is dirty (best effort), persist access statistics, release everything."""
        cat = self._catalog
        if cat is None or cat.closed:
            return
        cat.close()
        if self._flusher is not None:
            self._flusher.stop()
        cat.finish_deferred(wait=True)
        if self._index is not None and self._ladder.durable is not None:
            changed = [index_entry(e, loc) for e, loc in cat.access_changed()]
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
        return self._catalog is None or self._catalog.closed

    def _teardown(self) -> None:
        for tier in self._tiers:
            tier.close()
        self._tiers = []
        if self._remote is not None and self._owns_remote:
            self._remote.close()
        if self._engine is not None and self._owns_engine:
            self._engine.close()
        if self._index is not None:
            self._index.close()
            self._index = None
        if self._lock is not None:
            self._lock.release()


def _open_remote(spec) -> tuple[RemoteTier | None, bool]:
    """(remote tier, whether the store owns it): an instance is the caller's; a URL is opened here."""
    if spec is None or isinstance(spec, RemoteTier):
        return spec, False
    try:
        from hstore.tiers.remote import connect  # the Redis tier (issue 11) provides it
    except ImportError as e:
        raise StoreConfigError(f"remote={spec!r}: remote URLs need the Redis tier, which is not installed ({e})") from e
    try:
        return connect(spec), True
    except HStoreError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad URL or server is a config error at open
        raise StoreConfigError(f"cannot open the remote tier {spec!r}: {e}") from e

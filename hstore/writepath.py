"""The write path: validate everything, reserve landing slots, copy in, decide durability, install.

A put either lands whole or changes nothing: keys, tensors and the cost hint (asked of
every tier's eviction policy) are checked before any slot is taken, and the new entries
are installed in one step at the end. Whether a value will be made durable is decided
here, once: the durable tier must be able to hold it (`max_item_bytes`) and its admission
policy must admit it; otherwise the value is *memory-only* (counted, and reported by
`flush()`), and an older durable record of the key leaves the index before the new value
is visible, so nothing can ever pair the old bytes with the new dtype and shape.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from hstore.buffers import as_bytes, copy_bytes
from hstore.catalog import Catalog
from hstore.entry import NEEDS_DURABLE, NEEDS_REMOTE
from hstore.errors import CapacityError, InvalidItemError, StoreClosedError, StoreIOError, TierFullError
from hstore.foreground import BackgroundGate
from hstore.layout import cut_by_size
from hstore.ladder import TierLadder
from hstore.policy.base import AdmissionPolicy
from hstore.record import DTYPE_TO_CODE, MAX_NDIM
from hstore.tiers.base import Location


def normalize_key(key: str | bytes) -> bytes:
    """Keys are bytes; str keys are UTF-8 encoded (so "a" and b"a" are the same key)."""
    if type(key) is bytes:
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise InvalidItemError(f"keys must be str or bytes, not {type(key).__name__}")


def normalize_keys(keys) -> list[bytes]:
    """`normalize_key` for a batch (str and bytes keys, the common cases, without a call each)."""
    return [k.encode() if type(k) is str else k if type(k) is bytes else normalize_key(k) for k in keys]


def validate_tensor(tensor) -> torch.Tensor:
    """A dense, contiguous, storable view of `tensor`; InvalidItemError for anything else."""
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


@dataclass(slots=True)
class PreparedItem:
    key: bytes
    src: torch.Tensor
    nbytes: int
    footprint: int


class Writer:
    """Puts into the landing tier, with backpressure from the flusher when it is full of unwritten data."""

    def __init__(self, catalog: Catalog, ladder: TierLadder, admission: AdmissionPolicy | None, *,
                 put_timeout_s: float, flusher_alive: Callable[[], bool], remote: bool,
                 gate: BackgroundGate | None = None):
        """`gate`: a put that waits for the flusher to free DRAM overrides callers' holds on it."""
        self.gate = gate
        self.catalog = catalog
        self.ladder = ladder
        self.admission = admission
        self.put_timeout_s = put_timeout_s
        self.flusher_alive = flusher_alive
        self.remote = remote
        self._d2h_streams: dict[int, object] = {}

    # ------------------------------------------------------------------ validation
    def prepare(self, items: Sequence[tuple[str | bytes, torch.Tensor]], cost: float | None) -> list[PreparedItem]:
        """Every check a put makes, before it changes anything."""
        if cost is not None:
            if isinstance(cost, bool) or not isinstance(cost, (int, float)):
                raise InvalidItemError(f"cost must be a number or None, not {type(cost).__name__}")
            for policy in self.catalog.policies:
                try:
                    policy.check_cost(cost)
                except ValueError as e:
                    raise InvalidItemError(f"cost hint refused by the {policy.name} eviction policy: {e}") from None
        landing = self.ladder.landing.tier
        prepared = []
        for key, tensor in items:
            k = normalize_key(key)
            src = validate_tensor(tensor)
            nbytes = src.numel() * src.element_size()
            footprint = landing.footprint(nbytes)
            if footprint > landing.capacity:
                raise CapacityError(
                    f"an item of {nbytes} bytes cannot fit the {landing.name} tier ({landing.capacity} bytes); "
                    f"raise {landing.name}_bytes"
                )
            prepared.append(PreparedItem(k, src, nbytes, footprint))
        return prepared

    def groups(self, prepared: list[PreparedItem]) -> list[list[PreparedItem]]:
        """Groups of at most a quarter of the landing tier by footprint: reserving a group never waits on itself."""
        limit = self.ladder.landing.tier.capacity // 4
        return [[prepared[i] for i in g] for g in cut_by_size([p.footprint for p in prepared], limit)]

    # ------------------------------------------------------------------ one group
    def put_group(self, group: list[PreparedItem], cost: float | None, non_blocking: bool) -> None:
        cat, landing = self.catalog, self.ladder.landing
        with cat.operation():
            locs: list[Location] = []
            try:
                for item in group:
                    locs.append(self._reserve(item.nbytes))
                ready = self._copy_in([(landing.tier.view(loc), item.src) for loc, item in zip(locs, group)],
                                      non_blocking)
                self._install(group, locs, cost, ready)
            except BaseException:
                with cat.lock:
                    for loc in locs:
                        landing.tier.free(loc)
                raise

    def _durability_locked(self, item: PreparedItem, cost: float | None) -> tuple[int, bool]:
        """(pending writes, memory_only) for a new value."""
        durable = self.ladder.durable
        pending = NEEDS_REMOTE if self.remote else 0
        if durable is None:
            return pending, False
        if item.nbytes <= durable.tier.max_item_bytes and (
                self.admission is None or self.admission.admit(item.key, item.nbytes, cost)):
            return pending | NEEDS_DURABLE, False
        return pending, True

    def _install(self, group: list[PreparedItem], locs: list[Location], cost: float | None, ready) -> None:
        cat = self.catalog
        with cat.lock:
            decisions = [self._durability_locked(item, cost) for item in group]
        memory_only = [item.key for item, (_, mo) in zip(group, decisions) if mo]
        if memory_only:
            # Held across the drop and the install: a flusher commit of the old value cannot slip between.
            with cat.commit_lock:
                cat.check_open()
                cat.drop_indexed_committing(memory_only)
                self._install_locked(group, locs, cost, ready, decisions)
        else:
            self._install_locked(group, locs, cost, ready, decisions)

    def _install_locked(self, group, locs, cost, ready, decisions) -> None:
        cat, landing = self.catalog, self.ladder.landing
        now = time.time()
        with cat.cv:
            if cat.closed:
                raise StoreClosedError("the store is closed")
            st = cat.stats
            for item, loc, (pending, mo) in zip(group, locs, decisions):
                e = cat.new_entry_locked(item.key, item.src.dtype, tuple(item.src.shape), item.nbytes, cost, now)
                e.ready = ready
                cat.install_locked(e, pending, mo)
                cat.add_copy_locked(e, landing.index, loc)
                st.puts += 1
                st.bytes_put += item.nbytes
                st.memory_only_puts += mo
            landing.stats.bytes_written += sum(item.nbytes for item in group)

    # ------------------------------------------------------------------ slots and copies
    def _reserve(self, nbytes: int) -> Location:
        """A landing slot: evict clean copies, else wait for the flusher (backpressure)."""
        cat, landing = self.catalog, self.ladder.landing
        deadline = time.monotonic() + self.put_timeout_s
        failures = cat.flush_failures
        with cat.cv:
            while True:
                cat.check_open()
                cat.finish_deferred(wait=False)
                loc = self.ladder.allocate_evicting_locked(landing, nbytes)
                if loc is not None:
                    return loc
                err = cat.last_flush_error
                if (cat.flush_failures > failures or not self.flusher_alive()) and err is not None:
                    raise StoreIOError(f"{landing.name} is full of unflushed data and the flusher is failing: {err}",
                                       getattr(err, "errno", 0) or 0)
                if time.monotonic() > deadline:
                    raise TierFullError(
                        f"{landing.name} tier full: no clean item to evict within {self.put_timeout_s}s "
                        f"({len(cat.dirty)} items wait to be flushed)"
                    )
                cat.cv.notify_all()
                # waiting for the flusher: a caller's hold on it must not keep it waiting too
                with self.gate.urgent() if self.gate is not None else nullcontext():
                    cat.cv.wait(0.05)

    def _copy_in(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], non_blocking: bool):
        """Copy sources into landing slots; returns a CUDA event when device copies are still in flight."""
        stream = None
        pinned = self.ladder.landing.tier.pinned
        for dst, src in pairs:
            src_b = as_bytes(src)
            if not (non_blocking and src.is_cuda and pinned):
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

"""Reading a stored prefix layer by layer into device buffers, ahead of the compute that uses it.

A `LayerLoader` reads each loaded layer's chunks from the store into a ring of
`depth` buffers on the compute device (memory tiers: straight copies on a copy
stream, one per run of adjacent chunks; NVMe: io_uring into pinned staging,
then one host-to-device copy per run), while the caller's thread recomputes the
leading layers from tokens and then projects (hidden state) or reshapes (K/V)
each layer as its data arrives. I/O and compute overlap; a buffer is reused
only after the compute that read it has finished (events on a GPU, a semaphore
on the CPU), and a pinned staging buffer only after its copy to the GPU has
finished.

Reads that block (NVMe, or any read on a CPU device) run on a background
thread. On a GPU with every chunk in a memory tier nothing blocks: a copy is
only queued on the copy stream, so the caller's own thread queues them a few
layers ahead of its compute (`inline` mode). That keeps the GIL with one
thread: two threads that both launch GPU work would take turns and leave the
GPU idle between layers. Inline reads go through store leases (`hstore.lease`)
of a few layers at a time: the keys are looked up and pinned once per window,
and a layer is then one copy per run with no per-chunk host work.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass

import torch

from hcache_adapter.slot_ring import SlotRing
from hstore.buffers import ALIGN, align_up
from hstore.errors import HStoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRead:
    """What to load for one layer: the store keys of its chunks and one chunk's shape."""

    layer: int
    kind: str  # "H" or "K"
    keys: list[bytes] | list[str]  # bytes from a restore (locate_layers), what the store holds
    chunk_shape: tuple[int, ...]


@dataclass(frozen=True)
class ReadTime:
    """What one restore's reads from NVMe delivered: `nbytes` in `busy_s` seconds during which at least one
    was in flight (a reader waiting for a free buffer is not reading). The disk's bandwidth as a restore sees
    it, with the verification and the interpreter shared with the compute thread included."""

    nbytes: int
    busy_s: float


class _BusyClock:
    """Seconds during which at least one of several threads' reads was in flight, and their bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = 0.0
        self.busy_s = 0.0
        self.nbytes = 0

    def begin(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._since = time.perf_counter()
            self._in_flight += 1

    def end(self, nbytes: int) -> None:
        with self._lock:
            self._in_flight -= 1
            self.nbytes += nbytes
            if self._in_flight == 0:
                self.busy_s += time.perf_counter() - self._since


@dataclass
class LoadedLayer:
    data: torch.Tensor  # [valid_chunks, *chunk_shape] on the compute device
    valid_chunks: int  # chunks read and verified, from the first; the rest is not usable


class LayerLoader:
    """Background reader that stays at most `depth` layers ahead of the consumer."""

    # Inline mode: layers of copies queued ahead of the layer being computed (None: every layer with a free slot).
    # On the lent H200 (7B, TTFT timelines through hc.generate, methods interleaved on one lease, 512-key lease
    # windows) 3 ahead gave 30.8 ms at 4K against 33.1 for every free slot, and 97.2 against 103.1 at 16K: with
    # every free slot first the restore call queues ~1.5 GiB of copies before generate() starts its forward (30.5
    # ms of host time at 16K instead of 17.2) and the projections trail the copies (4K: done 3.4 ms after the
    # last copy instead of 0.7). Run O of the sixth session, one lease per restore, agreed (33.4 against 35.4).
    LOOKAHEAD: int | None = 3
    # Inline mode: keys per lease (whole reads, at least one). On the lent H200 one lease of a whole 4K restore
    # (2,048 keys) took 1.9 ms before the first copy could start; one per layer (64 keys), 4.0 ms in all (a lease's
    # fixed cost, ~60 us, 32 times). 512 keys: 8 layers of a 4K restore, 2 of a 16K one.
    LEASE_KEYS = 512

    def __init__(self, store, reads: list[LayerRead], dtype: torch.dtype, device: torch.device, *, depth: int = 3,
                 inline: bool | None = None, stream=None, where: list | None = None, ring: SlotRing | None = None,
                 lookahead: int | None = LOOKAHEAD, lease: bool = True, slot_bytes: int = 0,
                 expect_reads: int | None = None):
        """`inline`: None chooses (GPU and nothing on NVMe: inline); True/False force it (tests).
        `lookahead`: inline mode, layers of copies queued ahead of the layer being computed (None: every
        layer with a free slot; see `LOOKAHEAD`). `lease`: inline mode, read a layer through a
        `TieredStore.lease` of its keys (one pass over them, then one copy per run) instead of
        `get_many_into`.
        `stream`: the copy stream to use on a GPU (a new one when None). `where`: the tier of every
        key of `reads` in order, as `store.locate` gave it just before (saves locating again).
        `ring`: buffers shared with earlier restores (fresh ones when None or already lent).
        `slot_bytes`, `expect_reads`: an inline loader that `extend` will give more reads: the bytes its largest
        layer needs, and how many reads it will have (so that the ring is sized for them)."""
        self.store = store
        self.reads = reads
        self.dtype = dtype
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.depth = max(1, min(depth, max(len(reads), expect_reads or 0))) if reads else 1
        n_chunks = max((len(r.keys) for r in reads), default=0)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        chunk_bytes = max((_numel(r.chunk_shape) * itemsize for r in reads), default=0)
        self._slot_bytes = align_up(max(n_chunks * chunk_bytes, slot_bytes, 1), ALIGN)
        if ring is None or not ring.lend(self.depth, self._slot_bytes):  # none shared, or lent: buffers of its own
            ring = SlotRing(self.device)
            ring.lend(self.depth, self._slot_bytes)
        self._ring = ring
        self._slots = ring.buffers
        self._free_event = ring.free_events  # compute finished with the slot (GPU), across restores
        self._results: dict[int, LoadedLayer | BaseException] = {}
        self._cv = threading.Condition()
        self._credits = threading.Semaphore(self.depth)
        self._stop = False
        self.stream = (stream or torch.cuda.Stream(device=self.device)) if self.cuda else None
        self._located = where
        self._events: dict[int, object] = {}
        self._threads = [threading.Thread(target=self._run, name=f"hcache-loader-{w}", daemon=True)
                         for w in range(max(1, min(self.IO_WORKERS if self.cuda else 2, self.depth)))]
        self._next = 0  # thread mode: the next layer a worker takes
        self._fast_switch = False
        self._started = False
        self._inline_choice = inline
        self._where: dict[int, list] = {}  # inline mode: each read's tiers, as located by start()
        self.inline = False
        self._issued = 0  # inline mode: layers whose reads are queued
        if lookahead is not None and (not isinstance(lookahead, int) or lookahead < 1):
            raise ValueError(f"lookahead must be a positive int or None, got {lookahead!r}")
        self.lookahead = lookahead
        self._use_lease = lease
        self._lease = None  # inline mode: the lease of the reads from _lease_first on (_lease_rows: their first keys)
        self._lease_first = 0
        self._lease_rows: list[int] = []
        self._disk = _BusyClock()  # reads from NVMe (through staging), and a CPU's reader threads' reads

    IO_WORKERS = 8  # thread mode: layers read at once (the lent virtual disk: 1 reader 0.57 GB/s, 8 readers 1.51)

    def start(self) -> "LayerLoader":
        """Decide the mode and, reading from NVMe, start the reader threads (again: nothing)."""
        if not self.reads or self._started:
            return self
        self._started = True
        if self._inline_choice is not None:
            self.inline = self._inline_choice
        elif self.cuda:
            where = self._located or self.store.locate([k for r in self.reads for k in r.keys])
            self.inline = "nvme" not in where
            if self.inline:  # the same thread queues the reads right away: these locations are current
                starts = self._starts()
                self._where = {i: where[a:b] for i, (a, b) in enumerate(zip(starts, starts[1:]))}
        if not self.inline:
            _switch_interval.lower()
            self._fast_switch = True
            for t in self._threads:
                t.start()
        return self

    def _starts(self) -> list[int]:
        """Each read's first key in the flat list of every read's keys, then the total."""
        starts = [0]
        for r in self.reads:
            starts.append(starts[-1] + len(r.keys))
        return starts

    @staticmethod
    def queued_ahead(depth: int, lookahead: int | None) -> int:
        """Inline mode: layers whose reads are queued from the one being computed on (at least 1)."""
        return depth if lookahead is None else min(lookahead, depth)

    def prefetch(self, layers: int | None = None) -> None:
        """Queue the reads of the first `layers` layers now (None: every free buffer), so that they run while
        the caller recomputes leading layers or finishes its lookup. Thread mode reads ahead by itself."""
        if self.inline:
            self._issue_until(self.depth if layers is None else min(layers, self.depth))

    def extend(self, reads: list[LayerRead]) -> None:
        """Append `reads` to an inline loader before its consumer asks for them: the rest of a restore whose
        first layers were queued before its lookup had built every layer's keys."""
        if not self.inline:
            raise RuntimeError("only an inline loader can be extended (reader threads may have finished)")
        itemsize = _itemsize(self.dtype)
        for r in reads:
            if len(r.keys) * _numel(r.chunk_shape) * itemsize > self._slot_bytes:
                raise ValueError(f"layer {r.layer} does not fit this loader's slots ({self._slot_bytes} bytes)")
        self.reads = self.reads + list(reads)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for _ in range(self.depth + len(self._threads)):
            self._credits.release()
        for t in self._threads:
            if t.is_alive():
                t.join()
        if self._fast_switch:
            self._fast_switch = False
            _switch_interval.restore()
        self._close_lease()
        if self._ring is not None:
            self._ring.give_back()
            self._ring = None

    def read_time(self) -> ReadTime | None:
        """What its reads from NVMe delivered so far (None: none)."""
        if self._disk.nbytes == 0 or self._disk.busy_s <= 0:
            return None
        return ReadTime(self._disk.nbytes, self._disk.busy_s)

    # -- consumer side -------------------------------------------------------------
    def get(self, i: int) -> LoadedLayer:
        """Layer `i` of `reads` (blocks until read); on a GPU the current stream waits for its copy."""
        if self.inline:
            self._issue_until(i + self.queued_ahead(self.depth, self.lookahead))  # >= 1: layer i itself is queued
        with self._cv:
            while i not in self._results:
                self._cv.wait()
            result = self._results.pop(i)
        if isinstance(result, BaseException):
            raise result
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._events.pop(i))
        return result

    def release(self, i: int) -> None:
        """The consumer has queued all work that reads layer `i`'s buffer."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._free_event[i % self.depth] = ev
        self._credits.release()

    def _issue_until(self, end: int) -> None:
        """Inline mode: queue the reads of layers up to `end` (exclusive) whose buffer is free."""
        end = min(end, len(self.reads))
        while self._issued < end:
            j = self._issued
            try:
                result = self._load(j, self.reads[j])
            except BaseException as e:  # raised by get(j), like the thread's errors
                result = e
            self._results[j] = result
            self._issued += 1

    # -- loader threads ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._credits.acquire()  # a buffer is free: layer `_next` may be read into it
            with self._cv:
                if self._stop or self._next >= len(self.reads):
                    self._credits.release()  # wake the next worker so that it ends too
                    return
                i = self._next
                self._next += 1
            try:
                result = self._load(i, self.reads[i])
            except BaseException as e:  # handed to the consumer, which re-raises
                result = e
            with self._cv:
                self._results[i] = result
                self._cv.notify_all()

    def _load(self, i: int, read: LayerRead) -> LoadedLayer:
        slot = i % self.depth
        m = len(read.keys)
        buf = self._slots[slot][: m * _numel(read.chunk_shape) * _itemsize(self.dtype)]
        data = buf.view(self.dtype).view(m, *read.chunk_shape)
        if not self.cuda:
            found = self._read_leased(i, read, data) if self.inline and self._use_lease else None
            if found is None:
                if not self.inline:  # reader threads: the reads that may wait on the disk
                    self._disk.begin()
                try:
                    found = _read(self.store, read.keys, data)
                finally:
                    if not self.inline:
                        self._disk.end(data.numel() * data.element_size())
            return LoadedLayer(data, _prefix_len(found))
        with torch.cuda.stream(self.stream):
            if self._free_event[slot] is not None:
                self.stream.wait_event(self._free_event[slot])
            where = self._where.pop(i, None)
            found = self._read_leased(i, read, data) if self.inline and self._use_lease else None
            if found is None:
                where = where or self.store.locate(read.keys)
                if MEMORY_TIERS.issuperset(where):  # every chunk in a memory tier, one read of them all
                    found = _read(self.store, read.keys, data, non_blocking=True)
                else:
                    found = self._read_mixed(slot, read, data, where)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self._events[i] = ev
        return LoadedLayer(data, _prefix_len(found))

    def _read_leased(self, i: int, read: LayerRead, data: torch.Tensor) -> list[bool] | None:
        """Layer i held wholly in memory tiers, read through a lease (one copy per run of adjacent chunks);
        None when some chunk is elsewhere or missing (the caller reads it the general way)."""
        try:
            lease, row = self._lease_for(i)
            m = len(read.keys)
            if lease.count(row, row + m) < m:
                return None
            return lease.read_into(row, row + m, data, non_blocking=True)
        except HStoreError as e:  # a foreign or stale entry (dtype, shape), or a closed store: misses
            log.warning("restore: %s; treating these chunks as missing", e)
            return [False] * len(read.keys)

    def _lease_for(self, i: int):
        """(lease, first row) covering read i: one lease per window of reads of about `LEASE_KEYS` keys, taken
        when the first of them is read, so that the first copies wait for one window's lookup, not the whole
        restore's."""
        if self._lease is None or not self._lease_first <= i < self._lease_first + len(self._lease_rows) - 1:
            self._close_lease()
            rows, keys = [0], []
            for r in self.reads[i:]:
                if len(rows) > 1 and rows[-1] + len(r.keys) > self.LEASE_KEYS:
                    break
                keys += r.keys
                rows.append(rows[-1] + len(r.keys))
            self._lease = self.store.lease(keys)
            self._lease_first, self._lease_rows = i, rows
        return self._lease, self._lease_rows[i - self._lease_first]

    def _close_lease(self) -> None:
        if self._lease is not None:
            self._lease.close()  # its slots are freed once the copies queued from it have run
            self._lease = None

    def _read_mixed(self, slot: int, read: LayerRead, data: torch.Tensor, where: list) -> list[bool]:
        """A layer whose chunks lie in several tiers: memory tiers copied directly, NVMe through staging."""
        m = len(read.keys)
        found = [False] * m
        in_memory = [c for c in range(m) if where[c] in MEMORY_TIERS]
        if in_memory:
            ok = _read(self.store, [read.keys[c] for c in in_memory], _rows(data, in_memory), non_blocking=True)
            for c, f in zip(in_memory, ok):
                found[c] = f
        on_disk = [c for c in range(m) if where[c] == "nvme"]
        if on_disk:
            self._read_through_staging(slot, read, data, on_disk, found)
        return found

    def _read_through_staging(self, slot, read: LayerRead, data: torch.Tensor, chunks: list[int], found: list[bool]) -> None:
        """NVMe -> pinned staging (DMA, verified) -> one async copy per run of consecutive chunks."""
        nbytes = data.numel() * data.element_size()
        staging = self._ring.staging_for(slot, self._slot_bytes)[:nbytes].view(self.dtype).view(data.shape)
        self._disk.begin()
        try:
            ok = _read(self.store, [read.keys[c] for c in chunks], _rows(staging, chunks))
        finally:
            self._disk.end(len(chunks) * (nbytes // max(1, len(read.keys))))
        good = [c for c, f in zip(chunks, ok) if f]
        for c in good:
            found[c] = True
        for a, b in _runs(good):
            data[a:b].copy_(staging[a:b], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(self.stream)
        self._ring.staging_events[slot] = ev


MEMORY_TIERS = frozenset(("gpu", "dram"))  # tiers a read of which is a copy (no I/O wait)


class _SwitchInterval:
    """Lowers the interpreter's thread switch interval while any threaded restore runs.

    The compute thread (recomputing layers, launching kernels) holds the GIL
    almost all the time; a reader thread coming back from I/O then waits up to
    the switch interval (5 ms by default) for it, once per chunk it verifies,
    and the disk idles. Process-wide, so counted and put back when the last
    restore ends.
    """

    FAST_S = 0.0005

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None

    def lower(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, self.FAST_S))
            self._users += 1

    def restore(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setswitchinterval(self._saved)


_switch_interval = _SwitchInterval()


def _read(store, keys, outs, non_blocking: bool = False) -> list[bool]:
    """get_many_into that turns a shape/dtype mismatch into misses (a foreign or stale entry)."""
    try:
        return store.get_many_into(keys, outs, non_blocking=non_blocking, promote=False)
    except HStoreError as e:
        log.warning("restore: %s; treating these chunks as missing", e)
        return [False] * len(keys)


def _rows(data: torch.Tensor, idx: list[int]):
    """Rows `idx` of `data` as get_many_into's output: the stacked tensor itself when they are all of it."""
    if len(idx) == data.shape[0]:
        return data
    return [data[c] for c in idx]


def _runs(sorted_idx: list[int]) -> list[tuple[int, int]]:
    runs, start, prev = [], None, None
    for c in sorted_idx:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            runs.append((start, prev + 1))
            start = prev = c
    if start is not None:
        runs.append((start, prev + 1))
    return runs


def _prefix_len(found: list[bool]) -> int:
    for i, f in enumerate(found):
        if not f:
            return i
    return len(found)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()

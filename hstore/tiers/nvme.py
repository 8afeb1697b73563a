"""The NVMe tier: preallocated files (one per SSD directory), O_DIRECT, batched I/O.

Each item is a record: a 4 KiB self-describing header then the payload padded
to 4 KiB, so every transfer is aligned for O_DIRECT and the page cache never
hides the device's real speed. Items are striped over the directories by a
placement policy (HCache's multi-SSD layout, `hstore.layout.striping`); a
batch's records for one device are packed back to back into one extent
(`pack_layout`) and records that lie back to back move in one vectored op
(`merge_adjacent`), straight from the DRAM arena (no staging copy).
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import torch

from hstore.buffers import ALIGN, align_up, aligned_empty, as_bytes, copy_bytes, cuda_available
from hstore.errors import StoreConfigError, StoreIOError, TierFullError
from hstore.io.engine import IoEngine, IoOp
from hstore.layout import cut_by_size, merge_adjacent, pack_layout
from hstore.policy.base import PlacementPolicy
from hstore.record import HEADER_BYTES, RecordHeader, checksum
from hstore.tiers.base import DurableRead, DurableTier, Location, ReadStatus, ScannedRecord, WriteItem
from hstore.tiers.datafile import DataFile, scan_records

log = logging.getLogger(__name__)

IOV_MAX = 1024
MAX_OP_BYTES = 4 << 20  # merged ops stay this small so several are in flight at once
READ_SLICE_BYTES = 16 << 20  # reads are checked in slices this big, overlapped with the next slice's I/O


class NvmeTier(DurableTier):
    """Durable tier on local files. Durable when `write_many` returns (if `sync`)."""

    name = "nvme"

    def __init__(
        self,
        dirs: Sequence[Path],
        capacity: int,
        engine: IoEngine,
        placement: PlacementPolicy,
        *,
        sync: bool = True,
        verify: bool = True,
    ):
        per_device = (capacity // len(dirs)) // ALIGN * ALIGN
        if per_device < HEADER_BYTES + ALIGN:
            raise StoreConfigError(f"nvme_bytes={capacity} is too small for {len(dirs)} device(s)")
        self.engine = engine
        self.placement = placement
        self.sync = sync
        self.verify = verify
        self._lock = threading.Lock()
        self._read_pool: ThreadPoolExecutor | None = None
        self._seq = 0
        self.devices: list[DataFile] = []
        try:
            for d in dirs:
                self.devices.append(DataFile(Path(d), per_device))
        except BaseException:
            self.close()
            raise

    # -- space -----------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return sum(d.alloc.capacity for d in self.devices)

    @property
    def used(self) -> int:
        return sum(d.alloc.used for d in self.devices)

    @property
    def max_item_bytes(self) -> int:
        return min(d.alloc.capacity for d in self.devices) - HEADER_BYTES

    @property
    def paths(self) -> list[Path]:
        """The data files, by device index."""
        return [d.path for d in self.devices]

    def footprint(self, nbytes: int) -> int:
        return HEADER_BYTES + align_up(nbytes)

    def reserve(self, loc: Location) -> bool:
        if not 0 <= loc.device < len(self.devices) or loc.length != self.footprint(loc.nbytes):
            return False
        with self._lock:
            try:
                self.devices[loc.device].alloc.reserve(loc.offset, loc.length)
                return True
            except ValueError:
                return False

    def free(self, loc: Location) -> None:
        with self._lock:
            self.devices[loc.device].alloc.free(loc.offset)

    def _next_seq(self) -> int:
        """Write order of records, kept in their headers: of two records of one key, the later wins."""
        with self._lock:
            self._seq = max(time.time_ns(), self._seq + 1)
            return self._seq

    def _allocate(self, sizes: list[int], keys: list[bytes]) -> list[tuple[int, int]]:
        """(device, offset) per record; records of one device are packed into one extent when possible."""
        with self._lock:
            free = [d.alloc.free_bytes for d in self.devices]
            devs: list[int] = []
            for key, size in zip(keys, sizes):
                dev = self.placement.choose(key, size, free)
                if dev is None:
                    raise TierFullError(f"nvme tier is full ({sum(sizes)} bytes needed)")
                free[dev] -= size
                devs.append(dev)
            placed: list[tuple[int, int] | None] = [None] * len(sizes)
            taken: list[tuple[int, int]] = []
            try:
                for dev in sorted(set(devs)):
                    idx = [i for i, d in enumerate(devs) if d == dev]
                    alloc = self.devices[dev].alloc
                    offsets, total = pack_layout([sizes[i] - HEADER_BYTES for i in idx], ALIGN, HEADER_BYTES)
                    base = alloc.allocate(total)
                    if base is not None:
                        # One extent for the batch, then split per record so each frees on its own.
                        alloc.free(base)
                        for i, off in zip(idx, offsets):
                            alloc.reserve(base + off, sizes[i])
                            taken.append((dev, base + off))
                            placed[i] = (dev, base + off)
                        continue
                    for i in idx:  # fragmented: one extent per record
                        off = alloc.allocate(sizes[i])
                        if off is None:
                            raise TierFullError(f"nvme tier is too fragmented or full ({sum(sizes)} bytes needed)")
                        taken.append((dev, off))
                        placed[i] = (dev, off)
            except TierFullError:
                for dev, off in taken:
                    self.devices[dev].alloc.free(off)
                raise
            return placed  # type: ignore[return-value]

    def _release_extents(self, placed: list[tuple[int, int]]) -> None:
        """Free what `_allocate` handed out."""
        with self._lock:
            for dev, off in placed:
                self.devices[dev].alloc.free(off)

    # -- I/O -------------------------------------------------------------------
    def write_many(self, items: Sequence[WriteItem]) -> list[Location]:
        if not items:
            return []
        sizes = [self.footprint(it.payload.numel()) for it in items]
        placed = self._allocate(sizes, [it.key for it in items])
        headers = aligned_empty(HEADER_BYTES * len(items), pin=False)
        tails = aligned_empty(ALIGN * len(items), pin=False)
        keep: list[torch.Tensor] = []  # buffers that must outlive the I/O
        records = []
        for i, (item, (dev, off)) in enumerate(zip(items, placed)):
            payload = as_bytes(item.payload)
            if payload.device.type != "cpu":
                payload = payload.cpu()
            n = payload.numel()
            body = n // ALIGN * ALIGN
            if body and payload.data_ptr() % ALIGN:
                bounce = aligned_empty(n, pin=False)
                copy_bytes(bounce, payload)
                payload = bounce
            keep.append(payload)
            csum = checksum(payload)
            hdr = RecordHeader.for_item(item.key, item.dtype, tuple(item.shape), n, csum, self._next_seq()).pack()
            hslot = headers.narrow(0, i * HEADER_BYTES, HEADER_BYTES)
            hslot.copy_(torch.frombuffer(bytearray(hdr), dtype=torch.uint8))
            iov = [(hslot.data_ptr(), HEADER_BYTES)]
            if body:
                iov.append((payload.data_ptr(), body))
            if n > body:
                tslot = tails.narrow(0, i * ALIGN, ALIGN)
                tslot.zero_()
                copy_bytes(tslot[: n - body], payload[body:])
                iov.append((tslot.data_ptr(), ALIGN))
            records.append((dev, off, iov, Location(self.name, dev, off, sizes[i], n, csum)))
        ops = self._coalesce(records, write=True)
        results = self.engine.run([op for op, _ in ops])
        failure = next(((op, r) for (op, _), r in zip(ops, results) if r != op.expected), None)
        if failure is None and self.sync:
            for dev in sorted({dev for dev, _ in placed}):
                rc = self.engine.fsync(self.devices[dev].fd)
                if rc:
                    failure = (None, rc)
                    break
        if failure is not None:
            self._release_extents(placed)
            op, r = failure
            code = -r if r < 0 else errno.EIO
            what = "fsync" if op is None else ("short write" if r >= 0 else "write")
            raise StoreIOError(f"NVMe {what} failed: {os.strerror(code)}", code)
        del keep
        return [rec[3] for rec in records]

    def read_many(self, reads: Sequence[DurableRead]) -> list[ReadStatus]:
        n = len(reads)
        if n == 0:
            return []
        headers = aligned_empty(HEADER_BYTES * n, pin=False)
        tails = aligned_empty(ALIGN * n, pin=False)
        outs_b = [as_bytes(r.out) for r in reads]
        for r, ob in zip(reads, outs_b):
            if ob.numel() != r.loc.nbytes:
                raise ValueError(f"output buffer holds {ob.numel()} bytes, the item {r.loc.nbytes}")
        # Outputs we cannot DMA into (GPU, unaligned) are read through one bounce buffer.
        bounced = [i for i, ob in enumerate(outs_b) if ob.device.type != "cpu" or (ob.data_ptr() % ALIGN and ob.numel() >= ALIGN)]
        bounce_off: dict[int, int] = {}
        bounce = None
        if bounced:
            total = 0
            for i in bounced:
                bounce_off[i] = total
                total += align_up(reads[i].loc.nbytes)
            pin = cuda_available() and any(outs_b[i].device.type == "cuda" for i in bounced)
            bounce = aligned_empty(max(total, ALIGN), pin=pin)
        records = []
        dests: list[torch.Tensor] = []
        for i, r in enumerate(reads):
            loc = r.loc
            hslot = headers.narrow(0, i * HEADER_BYTES, HEADER_BYTES)
            iov = [(hslot.data_ptr(), HEADER_BYTES)]
            if i in bounce_off:
                dest = bounce.narrow(0, bounce_off[i], loc.nbytes)
                if loc.nbytes:
                    iov.append((dest.data_ptr(), align_up(loc.nbytes)))
            else:
                dest = outs_b[i]
                body = loc.nbytes // ALIGN * ALIGN
                if body:
                    iov.append((dest.data_ptr(), body))
                if loc.nbytes > body:
                    iov.append((tails.narrow(0, i * ALIGN, ALIGN).data_ptr(), ALIGN))
            dests.append(dest)
            records.append((loc.device, loc.offset, iov, i))
        ops = self._coalesce(records, write=False)
        status = [ReadStatus.OK] * n

        def finish(i: int) -> None:
            """Check record i's header and checksum, and move it into its output."""
            r, dest = reads[i], dests[i]
            loc = r.loc
            if i not in bounce_off:
                body = loc.nbytes // ALIGN * ALIGN
                if loc.nbytes > body:
                    copy_bytes(dest[body:], tails[i * ALIGN : i * ALIGN + loc.nbytes - body])
            hdr = RecordHeader.unpack(headers[i * HEADER_BYTES : (i + 1) * HEADER_BYTES].numpy())
            ok = hdr is not None and hdr.describes(r.key, r.dtype, r.shape, loc.nbytes, loc.checksum)
            if ok and self.verify:
                ok = checksum(dest) == loc.checksum
            if not ok:
                status[i] = ReadStatus.CORRUPT
            elif i in bounce_off:
                copy_bytes(outs_b[i], dest)

        # Pipeline: while one slice of the batch is checked (checksums, headers), the next is being read.
        slices = [[ops[j] for j in group] for group in cut_by_size([op.expected for op, _ in ops], READ_SLICE_BYTES)]
        pending = self._reader().submit(self.engine.run, [op for op, _ in slices[0]])
        for k, part in enumerate(slices):
            results = pending.result()
            if k + 1 < len(slices):
                pending = self._reader().submit(self.engine.run, [op for op, _ in slices[k + 1]])
            for (op, members), res in zip(part, results):
                if res != op.expected:
                    why = os.strerror(-res) if res < 0 else f"short read ({res} of {op.expected} bytes)"
                    log.error("NVMe read of %d record(s) at fd %d offset %d failed: %s", len(members), op.fd, op.offset, why)
                    for i in members:
                        status[i] = ReadStatus.IO_ERROR
                    continue
                for i in members:
                    finish(i)
        return status

    def scan(self) -> Iterator[ScannedRecord]:
        for dev, d in enumerate(self.devices):
            for offset, hdr in scan_records(d.path):
                loc = Location(self.name, dev, offset, self.footprint(hdr.nbytes), hdr.nbytes, hdr.checksum)
                yield ScannedRecord(loc, hdr.key, hdr.dtype, hdr.shape, hdr.seq, hdr.version)

    def _reader(self) -> ThreadPoolExecutor:
        """Threads that run the next slice's I/O while the caller checks the previous slice."""
        if self._read_pool is None:
            with self._lock:
                if self._read_pool is None:
                    self._read_pool = ThreadPoolExecutor(4, thread_name_prefix="hstore-nvme-read")
        return self._read_pool

    def _coalesce(self, records, *, write: bool) -> list[tuple[IoOp, list]]:
        """Merge records that are back to back on one device into one vectored op."""
        extents = [(dev, off, sum(length for _, length in iov)) for dev, off, iov, _ in records]
        runs = merge_adjacent(extents, max_bytes=MAX_OP_BYTES, parts=[len(r[2]) for r in records], max_parts=IOV_MAX)
        ops = []
        for run in runs:
            dev, off = records[run[0]][0], records[run[0]][1]
            iov = tuple(part for i in run for part in records[i][2])
            ops.append((IoOp(write, self.devices[dev].fd, off, iov), [records[i][3] for i in run]))
        return ops

    def close(self) -> None:
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
            self._read_pool = None
        for d in self.devices:
            d.close()

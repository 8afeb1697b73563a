"""The NVMe tier: preallocated files (one per SSD directory), O_DIRECT, batched I/O.

Each item is a record: a 4 KiB self-describing header then the payload padded
to 4 KiB, so every transfer is aligned for O_DIRECT and the page cache never
hides the device's real speed. Items are striped over the directories by a
placement policy (HCache's multi-SSD layout); a batch's records for one device
are packed back to back into one extent and written with one vectored op
straight from the DRAM arena (no staging copy).
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from hstore.buffers import ALIGN, align_up, aligned_empty, as_bytes, copy_bytes, cuda_available
from hstore.errors import StoreConfigError, StoreIOError, TierFullError
from hstore.io.engine import IoEngine, IoOp
from hstore.layout import pack_layout
from hstore.policy.base import PlacementPolicy
from hstore.record import HEADER_BYTES, RecordHeader, checksum, key_digest
from hstore.tiers.allocator import ExtentAllocator
from hstore.tiers.base import Location, ReadStatus, Tier, WriteItem

log = logging.getLogger(__name__)

IOV_MAX = 1024
DATA_FILE = "hstore.dat"
MAX_OP_BYTES = 4 << 20  # merged ops stay this small so several are in flight at once
READ_SLICE_BYTES = 16 << 20  # reads are checked in slices this big, overlapped with the next slice's I/O


class _Device:
    """One preallocated data file in one directory."""

    def __init__(self, directory: Path, size: int):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreConfigError(f"cannot use {directory} as an NVMe directory: {e.strerror or e}") from e
        self.path = directory / DATA_FILE
        created = not self.path.exists()
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
            self.direct = True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise StoreIOError(f"cannot open {self.path}: {e.strerror}", e.errno or 0) from e
            # tmpfs and some FUSE filesystems refuse O_DIRECT; correctness holds without it.
            log.warning("%s does not support O_DIRECT; NVMe tier falls back to buffered I/O there", directory)
            self.fd = os.open(self.path, flags, 0o644)
            self.direct = False
        current = os.fstat(self.fd).st_size
        if current > size:
            os.close(self.fd)
            raise StoreConfigError(
                f"{self.path} holds {current} bytes but the config asks for {size} per device; "
                "an NVMe tier cannot shrink (raise nvme_bytes or use a new root)"
            )
        if current < size:
            # Check first: a failed fallocate may have taken every free block before it gave up.
            vfs = os.statvfs(self.fd)
            free = vfs.f_bavail * vfs.f_frsize
            error: StoreIOError | None = None
            if size - current > free:
                error = StoreIOError(
                    f"cannot reserve {size} bytes for the NVMe tier in {directory}: only {free} bytes are free "
                    "(nvme_bytes is split evenly over nvme_dirs; lower it or free space)", errno.ENOSPC
                )
            else:
                try:
                    os.posix_fallocate(self.fd, 0, size)
                except OSError as e:
                    error = StoreIOError(
                        f"cannot reserve {size} bytes for the NVMe tier in {directory}: {e.strerror}", e.errno or 0
                    )
            if error is not None:
                self._give_back(current, created)
                raise error
        self.size = size
        self.alloc = ExtentAllocator(size, unit=ALIGN)

    def _give_back(self, size: int, created: bool) -> None:
        """Undo a failed reservation: back to `size` bytes, or no file at all if this call made it."""
        try:
            if created:
                os.unlink(self.path)
            else:
                os.ftruncate(self.fd, size)
        except OSError as e:
            log.warning("could not release the space reserved in %s: %s", self.path, e)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NvmeTier(Tier):
    """Persistent tier on local files. Durable when `write_many` returns (if `sync`)."""

    name = "nvme"
    persistent = True

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
        self.devices: list[_Device] = []
        try:
            for d in dirs:
                self.devices.append(_Device(Path(d), per_device))
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

    def footprint(self, nbytes: int) -> int:
        return HEADER_BYTES + align_up(nbytes)

    def reserve(self, loc: Location) -> bool:
        """Mark an indexed record's space used when reopening; False if it is out of range or overlaps."""
        if not 0 <= loc.device < len(self.devices):
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
            hdr = RecordHeader(item.dtype, tuple(item.shape), n, csum, key_digest(item.key)).pack()
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

    def read_many(self, keys: Sequence[bytes], locs: Sequence[Location], outs: Sequence[torch.Tensor]) -> list[ReadStatus]:
        n = len(locs)
        if n == 0:
            return []
        headers = aligned_empty(HEADER_BYTES * n, pin=False)
        tails = aligned_empty(ALIGN * n, pin=False)
        outs_b = [as_bytes(o) for o in outs]
        for loc, ob in zip(locs, outs_b):
            if ob.numel() != loc.nbytes:
                raise ValueError(f"output buffer holds {ob.numel()} bytes, the item {loc.nbytes}")
        # Outputs we cannot DMA into (GPU, unaligned) are read through one bounce buffer.
        bounced = [i for i, ob in enumerate(outs_b) if ob.device.type != "cpu" or (ob.data_ptr() % ALIGN and ob.numel() >= ALIGN)]
        bounce_off: dict[int, int] = {}
        bounce = None
        if bounced:
            total = 0
            for i in bounced:
                bounce_off[i] = total
                total += align_up(locs[i].nbytes)
            pin = cuda_available() and any(outs_b[i].device.type == "cuda" for i in bounced)
            bounce = aligned_empty(max(total, ALIGN), pin=pin)
        records = []
        dests: list[torch.Tensor] = []
        for i, loc in enumerate(locs):
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
            loc, dest = locs[i], dests[i]
            if i not in bounce_off:
                body = loc.nbytes // ALIGN * ALIGN
                if loc.nbytes > body:
                    copy_bytes(dest[body:], tails[i * ALIGN : i * ALIGN + loc.nbytes - body])
            hdr = RecordHeader.unpack(headers[i * HEADER_BYTES : (i + 1) * HEADER_BYTES].numpy())
            ok = (
                hdr is not None
                and hdr.key_digest == key_digest(keys[i])
                and hdr.nbytes == loc.nbytes
                and hdr.checksum == loc.checksum
            )
            if ok and self.verify:
                ok = checksum(dest) == loc.checksum
            if not ok:
                status[i] = ReadStatus.CORRUPT
            elif i in bounce_off:
                copy_bytes(outs_b[i], dest)

        # Pipeline: while one slice of the batch is checked (checksums, headers), the next is being read.
        slices = _slices(ops, READ_SLICE_BYTES)
        pending = self._reader().submit(self.engine.run, [op for op, _ in slices[0]])
        for k, part in enumerate(slices):
            results = pending.result()
            if k + 1 < len(slices):
                pending = self._reader().submit(self.engine.run, [op for op, _ in slices[k + 1]])
            for (op, members), r in zip(part, results):
                if r != op.expected:
                    why = os.strerror(-r) if r < 0 else f"short read ({r} of {op.expected} bytes)"
                    log.error("NVMe read of %d record(s) at fd %d offset %d failed: %s", len(members), op.fd, op.offset, why)
                    for i in members:
                        status[i] = ReadStatus.IO_ERROR
                    continue
                for i in members:
                    finish(i)
        return status

    def _reader(self) -> ThreadPoolExecutor:
        """Threads that run the next slice's I/O while the caller checks the previous slice."""
        if self._read_pool is None:
            with self._lock:
                if self._read_pool is None:
                    self._read_pool = ThreadPoolExecutor(4, thread_name_prefix="hstore-nvme-read")
        return self._read_pool

    def _coalesce(self, records, *, write: bool) -> list[tuple[IoOp, list]]:
        """Merge records that are back to back on one device into one vectored op."""
        ops: list[tuple[IoOp, list]] = []
        order = sorted(range(len(records)), key=lambda i: (records[i][0], records[i][1]))
        cur = None
        for i in order:
            dev, off, iov, tag = records[i]
            size = sum(length for _, length in iov)
            if (cur and cur["dev"] == dev and cur["end"] == off and len(cur["iov"]) + len(iov) <= IOV_MAX
                    and cur["end"] + size - cur["off"] <= MAX_OP_BYTES):
                cur["iov"].extend(iov)
                cur["end"] += size
                cur["tags"].append(tag)
                continue
            if cur:
                ops.append(cur)
            cur = {"dev": dev, "off": off, "end": off + size, "iov": list(iov), "tags": [tag]}
        if cur:
            ops.append(cur)
        return [
            (IoOp(write, self.devices[c["dev"]].fd, c["off"], tuple(c["iov"])), c["tags"]) for c in ops
        ]

    def close(self) -> None:
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
            self._read_pool = None
        for d in self.devices:
            d.close()


def _slices(ops: list, max_bytes: int) -> list[list]:
    """Consecutive groups of ops of about `max_bytes` each (at least one op per group)."""
    groups, cur, size = [], [], 0
    for item in ops:
        if cur and size + item[0].expected > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += item[0].expected
    if cur:
        groups.append(cur)
    return groups

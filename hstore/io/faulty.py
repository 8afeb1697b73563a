"""A fault-injecting engine for tests, in the spirit of CacheLib navy's.

Why: the NVMe tier's error paths (I/O errors, a full disk, a device that stops
short, silent corruption caught by checksums, a failed fsync) must be tested
against a real engine and real files, not mocks. `FaultyEngine` wraps any
engine and applies a list of `FaultRule`s: each says which ops it hits (by
direction, fd, byte range, the nth match, at most `times` times) and what it
does to them. Rules are checked in order; the first that fires wins. Every rule
counts its matches independently, so `nth` does not depend on other rules.

    engine = FaultyEngine(ThreadPoolEngine())
    engine.fail(errno.EIO, write=False, offsets=(0, 1 << 20))
    engine.fail(errno.ENOSPC, write=True, nth=3)
    engine.short(keep=4096, write=False, times=1)
    engine.flip(at=100, write=False, times=1)
    engine.fail_fsync(errno.EIO)
    engine.fail(errno.EIO, write=False, p=0.01, seed=7)   # 1% of reads, reproducibly: a fault campaign
"""
from __future__ import annotations

import ctypes
import enum
import errno as errno_mod
import random
import threading
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from hstore.io.engine import IoEngine, IoOp


class Fault(enum.Enum):
    FAIL = "fail"    # the op is not run; its result is -errno
    SHORT = "short"  # only the first `keep` bytes are transferred (as at end of file)
    FLIP = "flip"    # byte `at` of the op's data is XORed with `mask` (silent corruption)
    FSYNC = "fsync"  # fsync returns -errno without syncing


@dataclass
class FaultRule:
    """What to inject, and into which ops. Filters left as None match anything."""

    fault: Fault
    errno: int = errno_mod.EIO
    write: bool | None = None
    fd: int | None = None
    offsets: tuple[int, int] | None = None  # [start, stop): hits ops whose bytes overlap it
    nth: int | None = None  # fire only on the nth (0-based) op the filters match
    times: int | None = None  # fire at most this many times
    keep: int = 0  # SHORT: bytes to transfer
    at: int = 0  # FLIP: byte index within the op's data
    mask: int = 0x01  # FLIP: bits to flip
    p: float | None = None  # fire on each matching op with this probability (None: always)
    seed: int | None = None  # for `p`: the same seed fires on the same matching ops
    matched: int = 0  # ops (or fsyncs) the filters matched so far
    fired: int = 0  # times the fault was injected

    def __post_init__(self) -> None:
        if self.p is not None and not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        self._rng = random.Random(self.seed)

    def _filters_match(self, fd: int, write: bool | None, start: int, stop: int) -> bool:
        if self.fd is not None and fd != self.fd:
            return False
        if self.write is not None and write != self.write:
            return False
        if self.offsets is not None and not (start < self.offsets[1] and self.offsets[0] < stop):
            return False
        return True

    def eligible(self, fd: int, write: bool | None = None, start: int = 0, stop: int = 0) -> bool:
        """Count a match if the filters apply; True when the fault may fire on it."""
        if not self._filters_match(fd, write, start, stop):
            return False
        index = self.matched
        self.matched += 1
        if self.nth is not None and index != self.nth:
            return False
        if self.p is not None and self._rng.random() >= self.p:
            return False
        return self.times is None or self.fired < self.times


def _first_to_fire(
    rules: Iterable[FaultRule], fsync: bool, fd: int, write: bool | None = None, start: int = 0, stop: int = 0
) -> FaultRule | None:
    """The first eligible rule of the right kind, marked as fired. Every rule of
    that kind sees the event, so each one's `nth` counts independently."""
    chosen = None
    for rule in rules:
        if (rule.fault is Fault.FSYNC) == fsync and rule.eligible(fd, write, start, stop) and chosen is None:
            chosen = rule
    if chosen is not None:
        chosen.fired += 1
    return chosen


def _truncate(op: IoOp, keep: int) -> IoOp:
    """`op` cut down to its first `keep` bytes."""
    iov = []
    for addr, length in op.iov:
        if keep <= 0:
            break
        iov.append((addr, min(length, keep)))
        keep -= length
    return replace(op, iov=tuple(iov))


def _flip(op: IoOp, at: int, mask: int) -> bool:
    """XOR byte `at` of the op's data with `mask`; False if the op is shorter."""
    for addr, length in op.iov:
        if at < length:
            byte = ctypes.c_uint8.from_address(addr + at)
            byte.value ^= mask
            return True
        at -= length
    return False


class FaultyEngine(IoEngine):
    """Wraps `inner` (which it owns: `close()` closes it) and injects faults."""

    def __init__(self, inner: IoEngine, rules: Iterable[FaultRule] = ()):
        self.inner = inner
        self.name = f"faulty({inner.name})"
        self.rules: list[FaultRule] = list(rules)
        self._lock = threading.Lock()

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail(self, errno: int = errno_mod.EIO, **match) -> FaultRule:
        """Ops that match fail with -errno and transfer nothing."""
        return self.add(FaultRule(Fault.FAIL, errno=errno, **match))

    def short(self, keep: int = 0, **match) -> FaultRule:
        """Ops that match transfer only their first `keep` bytes."""
        return self.add(FaultRule(Fault.SHORT, keep=keep, **match))

    def flip(self, at: int = 0, mask: int = 0x01, **match) -> FaultRule:
        """Reads that match return with byte `at` flipped; writes that match put
        the flipped byte on the device (the caller's buffer is restored)."""
        return self.add(FaultRule(Fault.FLIP, at=at, mask=mask, **match))

    def fail_fsync(self, errno: int = errno_mod.EIO, fd: int | None = None, times: int | None = None,
                   p: float | None = None, seed: int | None = None) -> FaultRule:
        return self.add(FaultRule(Fault.FSYNC, errno=errno, fd=fd, times=times, p=p, seed=seed))

    @property
    def injected(self) -> int:
        """Faults injected so far, by every rule."""
        with self._lock:
            return sum(r.fired for r in self.rules)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def run(self, ops: Sequence[IoOp]) -> list[int]:
        with self._lock:
            plan = [_first_to_fire(self.rules, False, op.fd, op.write, op.offset, op.offset + op.expected) for op in ops]
        results = [0] * len(ops)
        sent: list[tuple[int, IoOp]] = []
        for i, (op, rule) in enumerate(zip(ops, plan)):
            if rule is None:
                sent.append((i, op))
            elif rule.fault is Fault.FAIL:
                results[i] = -rule.errno
            elif rule.fault is Fault.SHORT:
                sent.append((i, _truncate(op, rule.keep)))
            else:  # FLIP: corrupt what goes to the device now, what came back later
                if op.write:
                    _flip(op, rule.at, rule.mask)
                sent.append((i, op))
        done = self.inner.run([op for _, op in sent]) if sent else []
        for (i, op), result in zip(sent, done):
            results[i] = result
            rule = plan[i]
            if rule is not None and rule.fault is Fault.FLIP:
                if op.write:
                    _flip(op, rule.at, rule.mask)  # give the caller its buffer back
                elif result > rule.at:
                    _flip(op, rule.at, rule.mask)
        return results

    def fsync(self, fd: int) -> int:
        with self._lock:
            fired = _first_to_fire(self.rules, True, fd)
        if fired is not None:
            return -fired.errno
        return self.inner.fsync(fd)

    def close(self) -> None:
        self.inner.close()

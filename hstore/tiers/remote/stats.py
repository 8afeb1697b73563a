"""What the remote tier counts: outcomes per key, errors by kind, and batch latency percentiles."""
from __future__ import annotations

import threading
from collections import Counter, deque

import redis.exceptions as rex

_WINDOW = 2048  # latency samples kept per operation (the most recent batches)


def error_kind(exc: BaseException) -> str:
    """A short name for what went wrong talking to Redis (the key of `errors` in the stats)."""
    if isinstance(exc, rex.TimeoutError):
        return "timeout"
    if isinstance(exc, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError, rex.NoPermissionError)):
        return "auth"
    if isinstance(exc, rex.ConnectionError):
        return "connection"
    if isinstance(exc, rex.OutOfMemoryError) or str(exc).startswith("OOM"):
        return "oom"
    if isinstance(exc, (rex.AskError, rex.TryAgainError, rex.ClusterError, rex.RedisClusterException,
                        rex.ClusterCrossSlotError)):
        return "cluster"
    if isinstance(exc, rex.ReadOnlyError):
        return "readonly"
    if isinstance(exc, rex.ResponseError):
        return "response"
    return "other"


def is_outage(kind: str) -> bool:
    """Errors that mean the server cannot be talked to now (the breaker opens), as opposed to
    errors of one command (out of memory, a wrong type) after which it is still up."""
    return kind in ("timeout", "connection", "cluster")


class LatencyWindow:
    """Durations of the most recent batches: p50 / p99 / mean in milliseconds."""

    def __init__(self, size: int = _WINDOW):
        self._samples: deque[float] = deque(maxlen=size)
        self.count = 0

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.count += 1

    def summary(self) -> dict:
        if not self._samples:
            return {"batches": self.count, "p50_ms": None, "p99_ms": None, "mean_ms": None}
        ordered = sorted(self._samples)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return {"batches": self.count, "p50_ms": round(pick(0.50) * 1e3, 3), "p99_ms": round(pick(0.99) * 1e3, 3),
                "mean_ms": round(sum(ordered) / len(ordered) * 1e3, 3)}


class RemoteStats:
    """Thread-safe counters of one remote tier."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # hits, misses, bytes_read, bytes_written, writes, deletes, ...
        self.errors: Counter[str] = Counter()  # by error_kind(), plus "corrupt" and "newer_format" values
        self.dropped: Counter[str] = Counter()  # writes dropped, by reason
        self.latency = {"read": LatencyWindow(), "write": LatencyWindow()}

    def add(self, **counts: int) -> None:
        with self._lock:
            self.counts.update(counts)

    def error(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.errors[kind] += n

    def drop(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[reason] += n
            self.counts["writes_dropped"] += n

    def timed(self, op: str, seconds: float, nbytes: int) -> None:
        """A batch of `op` ("read", "write") took `seconds` for `nbytes` of values."""
        with self._lock:
            self.latency[op].add(seconds)
            self.counts[f"{op}_seconds_us"] += int(seconds * 1e6)
            self.counts[f"{op}_batch_bytes"] += nbytes

    def snapshot(self) -> dict:
        with self._lock:
            c = self.counts
            return {
                "hits": c["hits"], "misses": c["misses"], "bytes_read": c["bytes_read"],
                "bytes_written": c["bytes_written"], "writes": c["writes"], "writes_dropped": c["writes_dropped"],
                "deletes": c["deletes"], "corrupt_deleted": c["corrupt_deleted"],
                "skipped_while_down": c["skipped_while_down"],
                "errors": dict(self.errors), "dropped": dict(self.dropped),
                "latency": {op: w.summary() for op, w in self.latency.items()},
                # what the server delivered while the tier waited on it: the rate a planner can expect
                "read_gbps": _rate(c["read_batch_bytes"], c["read_seconds_us"]),
                "write_gbps": _rate(c["write_batch_bytes"], c["write_seconds_us"]),
            }


def _rate(nbytes: int, micros: int) -> float | None:
    return round(nbytes / micros / 1e3, 3) if micros else None

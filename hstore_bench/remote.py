"""`hstore bench --remote URL`: the remote tier's GB/s next to plain redis-py on the same server.

For each chunk size, `total` bytes of chunks move four ways, in batches of `batch_bytes`:
the tier's `write_many` (records: header + payload, from uint8 tensors) and `read_many` (every
value checked), and a plain redis-py client with its defaults (hiredis when installed) doing
pipelined SET of `bytes` values and pipelined GET of the same sizes: what an application
talking to Redis directly would get. Medians over `repeat` rounds; in odd rounds the raw client
goes first, so neither side always finds a warmer server. ratio = the median over rounds of
tier / raw within a round, so a host whose speed drifts during the run moves both sides of each
ratio alike (the issue's target: >= 0.9). Everything lives under a private namespace, cleared
after each measurement, so the server holds at most `total` bytes of the run at a time.

A harness, outside the library like the rest of hstore_bench: only the CLI imports it.
"""
from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import redis
import torch

from hstore.units import format_size
from hstore.tiers.base import WriteItem
from hstore.tiers.remote import RedisTier, RemoteConfig
from hstore.tiers.remote.shards import connection_kwargs

MiB = 1 << 20
DEFAULT_SIZES = (256 << 10, 512 << 10, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)
TARGET_RATIO = 0.9


@dataclass
class RemoteBenchConfig:
    url: str
    sizes: Sequence[int] = DEFAULT_SIZES
    total: int = 256 * MiB
    repeat: int = 3
    batch_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError("sizes must be positive")
        if self.total < max(self.sizes) or self.repeat < 1 or self.batch_bytes < 1:
            raise ValueError("total must hold at least one chunk of the largest size; repeat and batch >= 1")


@dataclass
class RemoteBenchRow:
    chunk_bytes: int
    chunks: int
    tier_write_gbps: float
    raw_set_gbps: float
    tier_read_gbps: float
    raw_get_gbps: float
    write_ratio: float  # median over rounds of tier / raw within the round (robust to a drifting host)
    read_ratio: float

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _raw_client(cfg: RemoteConfig):
    """A plain redis-py client with redis-py's defaults, on the tier's server and credentials."""
    kw = connection_kwargs(cfg)
    for ours in ("connection_class", "max_connections"):
        kw.pop(ours)
    if cfg.endpoint.tls:
        kw["ssl"] = True
    (host, port), *_ = cfg.endpoint.nodes
    if cfg.endpoint.cluster:
        return redis.cluster.RedisCluster(host=host, port=port, **kw)
    return redis.Redis(host=host, port=port, db=cfg.endpoint.db, **kw)


def _batches(keys: list[bytes], per_batch: int):
    for start in range(0, len(keys), per_batch):
        yield keys[start : start + per_batch]


class _Round:
    """One chunk size: the same keys and bytes for the tier and the raw client."""

    def __init__(self, tier: RedisTier, raw, prefix: bytes, chunk: int, total: int, batch_bytes: int):
        self.tier, self.raw, self.prefix, self.chunk = tier, raw, prefix, chunk
        self.n = max(1, total // chunk)
        self.per_batch = max(1, batch_bytes // chunk)
        self.keys = [b"%d-%d" % (chunk, i) for i in range(self.n)]
        pool = torch.randint(0, 256, (min(self.n, 8), chunk), dtype=torch.uint8)  # distinct, incompressible
        self.payloads = [pool[i % len(pool)] for i in range(self.n)]
        self.raw_values = [bytes(p.numpy()) for p in self.payloads[: len(pool)]]

    def _gbps(self, seconds: float) -> float:
        return self.n * self.chunk / seconds / 1e9

    def tier_write(self) -> float:
        items = [WriteItem(k, p, torch.uint8, (self.chunk,)) for k, p in zip(self.keys, self.payloads)]
        start = time.perf_counter()
        for batch in _batches(items, self.per_batch):
            if not all(self.tier.write_many(batch)):
                raise RuntimeError(f"the remote tier dropped writes: {self.tier.stats()['dropped']}")
        return self._gbps(time.perf_counter() - start)

    def tier_read(self) -> float:
        start = time.perf_counter()
        for batch in _batches(self.keys, self.per_batch):
            if any(r is None for r in self.tier.read_many(batch)):
                raise RuntimeError("the remote tier missed keys it had just written (maxmemory too small?)")
        seconds = time.perf_counter() - start
        self.tier.clear()
        return self._gbps(seconds)

    def raw_set(self) -> float:
        start = time.perf_counter()
        for batch in _batches(list(range(self.n)), self.per_batch):
            pipe = self.raw.pipeline(transaction=False)
            for i in batch:
                pipe.set(self.prefix + self.keys[i], self.raw_values[i % len(self.raw_values)])
            pipe.execute()
        return self._gbps(time.perf_counter() - start)

    def raw_get(self) -> float:
        start = time.perf_counter()
        for batch in _batches(self.keys, self.per_batch):
            pipe = self.raw.pipeline(transaction=False)
            for key in batch:
                pipe.get(self.prefix + key)
            if any(v is None for v in pipe.execute()):
                raise RuntimeError("redis-py missed keys it had just written (maxmemory too small?)")
        seconds = time.perf_counter() - start
        self.tier.clear()  # the raw keys are in the tier's namespace too
        return self._gbps(seconds)


def run_remote_bench(cfg: RemoteBenchConfig, progress: Callable[[int, int, str], None] | None = None
                     ) -> list[RemoteBenchRow]:
    remote = RemoteConfig(cfg.url, namespace=f"hstore-bench-{uuid.uuid4().hex[:8]}", socket_timeout_s=30.0)
    tier = RedisTier(remote)
    raw = _raw_client(remote)
    rows, steps, done = [], len(cfg.sizes) * cfg.repeat, 0
    try:
        for chunk in cfg.sizes:
            r = _Round(tier, raw, remote.key_prefix, chunk, cfg.total, cfg.batch_bytes)
            runs: dict[str, list[float]] = {"tw": [], "tr": [], "rs": [], "rg": []}
            for rep in range(cfg.repeat):
                order = [("tw", r.tier_write), ("tr", r.tier_read), ("rs", r.raw_set), ("rg", r.raw_get)]
                if rep % 2:
                    order = order[2:] + order[:2]
                for name, measure in order:
                    runs[name].append(measure())
                done += 1
                if progress:
                    progress(done, steps, format_size(chunk))
            med = {k: statistics.median(v) for k, v in runs.items()}
            paired = {side: statistics.median(t / raw for t, raw in zip(runs[a], runs[b]))
                      for side, a, b in (("write", "tw", "rs"), ("read", "tr", "rg"))}
            rows.append(RemoteBenchRow(chunk, r.n, med["tw"], med["rs"], med["tr"], med["rg"],
                                       paired["write"], paired["read"]))
    finally:
        try:
            tier.clear()
        finally:
            tier.close()
            raw.close()
    return rows


def format_rows(url: str, rows: Sequence[RemoteBenchRow]) -> str:
    out = [f"remote tier {url} against plain redis-py (pipelined SET/GET of bytes), GB/s, "
           f"medians; target ratio >= {TARGET_RATIO}",
           f"{'chunk':>8} {'chunks':>7} {'write':>7} {'SET':>7} {'ratio':>6} {'read':>7} {'GET':>7} {'ratio':>6}"]
    for r in rows:
        out.append(f"{format_size(r.chunk_bytes):>8} {r.chunks:>7} {r.tier_write_gbps:>7.2f} {r.raw_set_gbps:>7.2f} "
                   f"{r.write_ratio:>6.2f} {r.tier_read_gbps:>7.2f} {r.raw_get_gbps:>7.2f} {r.read_ratio:>6.2f}")
    return "\n".join(out)

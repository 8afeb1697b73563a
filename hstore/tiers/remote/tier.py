"""RedisTier: the remote tier on Redis, one server or a Redis Cluster.

Each key is one Redis string "<namespace>:<key>" holding a self-describing record (codec.py).
Batches travel as pipelines, one per server (shards.py), sent in parallel on a cluster.
Everything that can go wrong on the network is an outcome, never an exception: a read that
fails is a miss, a write that fails is dropped and counted (the local tiers still hold the data),
and a server that failed is skipped until its backoff passes (health.py), so a dead server costs
a caller at most one bounded timeout. The first failure of an outage logs one warning; the
recovery logs one line; nothing in between.

Values written by two nodes under one key are byte-identical (keys are content hashes upstream),
so concurrent SETs race harmlessly; a reader deleting a corrupt value while another node rewrites
it loses at most a cache entry.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import redis
import torch

from hstore.errors import InvalidItemError, StoreClosedError
from hstore.tiers.base import RemoteRecord, RemoteTier, WriteItem
from hstore.tiers.remote import namespace
from hstore.tiers.remote.codec import Verdict, decode, encode_header
from hstore.tiers.remote.config import RemoteConfig
from hstore.tiers.remote.shards import Shard, make_router
from hstore.tiers.remote.stats import RemoteStats, error_kind, is_outage
from hstore.tiers.remote.wire import SplitValue

log = logging.getLogger(__name__)

_READ_PIPELINE_KEYS = 256  # GETs per round trip (bounds what the server buffers for one connection)


def _byte_batches(idx: list[int], sizes: list[int], limit: int):
    """Consecutive runs of `idx` of at most `limit` bytes each (a bigger item goes alone)."""
    start, size = 0, 0
    for j, n in enumerate(sizes):
        if j > start and size + n > limit:
            yield idx[start:j]
            start, size = j, 0
        size += n
    if start < len(idx):
        yield idx[start:]


def _show(key: bytes) -> str:
    return repr(key[:48]) + ("..." if len(key) > 48 else "")


class RedisTier(RemoteTier):
    """The remote tier. `RedisTier("redis://host:6379/0")` or `RedisTier(RemoteConfig(...))`.

    Raises StoreConfigError at construction for a bad URL, a wrong password, an ACL that keeps
    the user out of the namespace, or a URL whose mode (cluster or not) the server contradicts.
    """

    name = "remote"

    def __init__(self, config: RemoteConfig | str):
        self.config = config if isinstance(config, RemoteConfig) else RemoteConfig(config)
        self._prefix = self.config.key_prefix
        self._px = int(self.config.ttl_s * 1000) or None
        self._stats = RemoteStats()
        self._router = make_router(self.config)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._oom_warned = False
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisTier({self.config.url!r}, namespace={self.config.namespace!r})"

    def __enter__(self) -> "RedisTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the interface
    def write_many(self, items: Sequence[WriteItem]) -> list[bool]:
        self._check_open()
        values = [self._encode(item) for item in items]
        rkeys = [self._prefix + item.key for item in items]
        done = [False] * len(items)

        def write(shard: Shard, idx: list[int]) -> None:
            sent = 0
            for batch in _byte_batches(idx, [values[i].nbytes for i in idx], self.config.pipeline_bytes):
                start = time.perf_counter()
                replies = self._exchange(shard, len(batch), lambda: shard.pipelined(
                    lambda p: [p.set(rkeys[i], values[i], px=self._px) for i in batch]))
                if replies is None:
                    self._stats.drop("unreachable", len(idx) - sent)
                    return
                self._stats.timed("write", time.perf_counter() - start, sum(values[i].nbytes for i in batch))
                sent += len(batch)
                refused = 0
                for i, reply in zip(batch, replies):
                    if isinstance(reply, Exception):
                        refused += 1
                        self._write_refused(shard, reply)
                    else:
                        done[i] = True
                        self._stats.add(writes=1, bytes_written=items[i].payload.numel())
                if not refused:
                    self._oom_warned = False  # the next out-of-memory episode warns again

        self._per_shard(rkeys, write, on_unrouted=lambda n: self._stats.drop("unreachable", n))
        return done

    def read_many(self, keys: Sequence[bytes]) -> list[RemoteRecord | None]:
        self._check_open()
        rkeys = [self._prefix + k for k in keys]
        found: list[RemoteRecord | None] = [None] * len(keys)

        def read(shard: Shard, idx: list[int]) -> None:
            bad: list[int] = []
            received = [0]

            def check(i: int, reply) -> None:
                if reply is None:
                    return
                received[0] += len(reply) if isinstance(reply, bytes) else 0
                if isinstance(reply, Exception):
                    self._stats.error(error_kind(reply))
                    self._note_topology(reply)
                    if "WRONGTYPE" in str(reply):  # not a string: not ours as written
                        self._stats.error("corrupt")
                        bad.append(i)
                    return
                record, verdict = decode(keys[i], reply)
                if verdict is Verdict.OK:
                    found[i] = record
                    return
                self._stats.error(verdict.value)
                if verdict is Verdict.CORRUPT:
                    bad.append(i)

            for start in range(0, len(idx), _READ_PIPELINE_KEYS):
                batch = idx[start : start + _READ_PIPELINE_KEYS]
                began, received[0] = time.perf_counter(), 0
                done = self._exchange(shard, len(batch), lambda: shard.get_each(
                    [rkeys[i] for i in batch], lambda j, reply: check(batch[j], reply)))
                if done is None:
                    break
                self._stats.timed("read", time.perf_counter() - began, received[0])
            if bad:
                self._delete_corrupt(shard, [keys[i] for i in bad], [rkeys[i] for i in bad])

        self._per_shard(rkeys, read)
        hits = [r for r in found if r is not None]
        self._stats.add(hits=len(hits), misses=len(keys) - len(hits),
                        bytes_read=sum(r.payload.numel() for r in hits))
        return found

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_open()
        rkeys = [self._prefix + k for k in keys]
        there = [False] * len(keys)

        def probe(shard: Shard, idx: list[int]) -> None:
            replies = self._exchange(shard, len(idx), lambda: shard.pipelined(
                lambda p: [p.exists(rkeys[i]) for i in idx]))
            for i, reply in zip(idx, replies or ()):
                there[i] = reply == 1

        self._per_shard(rkeys, probe)
        return there

    def delete_many(self, keys: Sequence[bytes]) -> None:
        self._check_open()
        rkeys = [self._prefix + k for k in keys]

        def unlink(shard: Shard, idx: list[int]) -> None:
            replies = self._exchange(shard, len(idx), lambda: shard.pipelined(
                lambda p: [p.unlink(rkeys[i]) for i in idx]))
            self._stats.add(deletes=sum(1 for r in replies or () if r == 1))

        self._per_shard(rkeys, unlink)

    def stats(self) -> dict:
        snap = self._stats.snapshot()
        shards = self._router.shards() if not self._closed else []
        snap.update(name=self.name, url=self.config.url, namespace=self.config.namespace,
                    mode="cluster" if self.config.endpoint.cluster else "standalone",
                    servers={s.name: "up" if s.breaker.up else "down" for s in shards})
        snap["reachable"] = bool(shards) and all(s.breaker.up for s in shards)
        return snap

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self._router.close()

    def shards(self) -> list[Shard]:
        """The servers holding the namespace now (the primaries, on a cluster)."""
        self._check_open()
        return self._router.shards()

    def describe(self) -> list[dict]:
        """Per server: memory, eviction and the namespace's keys and bytes (a SCAN: for tools, not hot paths)."""
        return namespace.summarize(self.shards(), self._prefix)

    def clear(self) -> int:
        """Delete every key of this tier's namespace (and nothing else); returns how many."""
        return namespace.clear(self.shards(), self._prefix)

    # ------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self!r} is closed")

    def _encode(self, item: WriteItem) -> SplitValue:
        payload = item.payload
        if not isinstance(payload, torch.Tensor) or payload.dtype.itemsize != 1:
            raise InvalidItemError(f"a remote write's payload must be a uint8 tensor, got {type(payload).__name__}")
        payload = payload.detach().reshape(-1)
        if payload.device.type != "cpu":
            payload = payload.cpu()
        view = memoryview(payload.numpy()) if payload.numel() else memoryview(b"")
        return SplitValue((encode_header(item.key, item.dtype, tuple(item.shape), view), view))

    def _per_shard(self, rkeys: list[bytes], work: Callable[[Shard, list[int]], None],
                   on_unrouted: Callable[[int], None] | None = None) -> None:
        """Run `work(shard, indices)` for each shard holding some of the keys; in parallel on a cluster."""
        groups, unrouted = self._router.route(rkeys)
        if unrouted and on_unrouted is not None:
            on_unrouted(len(unrouted))
        if unrouted:
            self._stats.add(skipped_while_down=len(unrouted))
        if len(groups) <= 1:
            for shard, idx in groups.items():
                work(shard, idx)
            return
        executor = self._parallel()
        for future in [executor.submit(work, shard, idx) for shard, idx in groups.items()]:
            future.result()

    def _parallel(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hstore-remote")
            return self._executor

    def _exchange(self, shard: Shard, n: int, call: Callable[[], object]):
        """One round trip of `n` commands to `shard` (`call()` does it): what `call` returns (for a
        pipeline, its replies; a refused command's reply is an exception), or None when the shard
        is down or failed now (its keys miss or are dropped)."""
        if not shard.breaker.allow():
            self._stats.add(skipped_while_down=n)
            return None
        try:
            result = call()
        except (redis.exceptions.RedisError, OSError) as e:
            self._failed(shard, e)
            return None
        down_for = shard.breaker.success()
        if down_for is not None:
            log.warning("remote %s: %s is reachable again after %.1f s", self.config.url, shard.name, down_for)
        for reply in result if isinstance(result, list) else ():
            if isinstance(reply, Exception):
                self._note_topology(reply)
        return result

    def _note_topology(self, reply: Exception) -> None:
        if str(reply).startswith(("MOVED", "ASK")):  # the slot map is out of date
            self._router.stale()

    def _failed(self, shard: Shard, exc: BaseException) -> None:
        kind = error_kind(exc)
        self._stats.error(kind)
        if not is_outage(kind):
            log.debug("remote %s: %s: %s", self.config.url, shard.name, exc)
            return
        if kind != "timeout":  # refused or reset: the primary may have moved (a slow one has not)
            self._router.stale()
        if shard.breaker.failure():
            log.warning("remote %s: %s is unreachable (%s: %s); its reads miss and its writes are dropped "
                        "(counted) until it is back", self.config.url, shard.name, type(exc).__name__, exc)

    def _write_refused(self, shard: Shard, reply: Exception) -> None:
        kind = error_kind(reply)
        self._stats.error(kind)
        self._stats.drop(kind)
        if kind == "oom":
            with self._lock:
                warn, self._oom_warned = not self._oom_warned, True
            if warn:
                log.warning("remote %s: %s is out of memory and refuses writes (%s); they are dropped (counted). "
                            "Deploy it with maxmemory-policy allkeys-lru", self.config.url, shard.name, reply)
        else:
            log.debug("remote %s: %s refused a write: %s", self.config.url, shard.name, reply)

    def _delete_corrupt(self, shard: Shard, keys: list[bytes], rkeys: list[bytes]) -> None:
        for key in keys:
            log.warning("remote %s: the value of %s failed its check (key, dtype, shape or checksum); deleted",
                        self.config.url, _show(key))
        replies = self._exchange(shard, len(rkeys), lambda: shard.pipelined(
            lambda p: [p.unlink(k) for k in rkeys]))
        self._stats.add(corrupt_deleted=sum(1 for r in replies or () if r == 1))

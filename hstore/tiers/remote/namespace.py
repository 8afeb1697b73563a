"""Namespace-wide operations for tools and tests, never on the data path: summarise and clear.

Both SCAN "<namespace>:*" on every server (each primary of a cluster), a few hundred keys per
round trip; nothing outside the namespace is read or touched.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import redis

from hstore.tiers.remote.shards import Shard

_SCAN_COUNT = 500
_INFO_FIELDS = ("redis_version", "used_memory", "maxmemory", "maxmemory_policy", "evicted_keys",
                "keyspace_hits", "keyspace_misses", "connected_clients")


def _keys(shard: Shard, prefix: bytes) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for key in shard.client.scan_iter(match=prefix + b"*", count=_SCAN_COUNT):
        batch.append(key)
        if len(batch) >= _SCAN_COUNT:
            yield batch
            batch = []
    if batch:
        yield batch


def summarize(shards: Sequence[Shard], prefix: bytes) -> list[dict]:
    """Per server: what INFO says about memory and eviction, and the namespace's keys and value bytes."""
    out = []
    for shard in shards:
        row: dict = {"server": shard.name}
        try:
            info = shard.client.info()
            row.update({k: info.get(k) for k in _INFO_FIELDS})
            keys = value_bytes = 0
            for batch in _keys(shard, prefix):
                pipe = shard.client.pipeline(transaction=False)
                for key in batch:
                    pipe.strlen(key)
                sizes = pipe.execute(raise_on_error=False)
                keys += len(batch)
                value_bytes += sum(n for n in sizes if isinstance(n, int))
            row.update(namespace_keys=keys, namespace_value_bytes=value_bytes)
        except (redis.exceptions.RedisError, OSError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
        out.append(row)
    return out


def clear(shards: Sequence[Shard], prefix: bytes) -> int:
    """Delete every key of the namespace; returns how many went. Raises on a server that fails."""
    removed = 0
    for shard in shards:
        for batch in _keys(shard, prefix):
            pipe = shard.client.pipeline(transaction=False)
            for key in batch:
                pipe.unlink(key)
            removed += sum(pipe.execute())
    return removed

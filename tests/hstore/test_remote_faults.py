"""Faults are misses, never errors: a server killed, restarted empty, paused, unreachable, full.

Each test that breaks its server has one of its own (`redis_fresh`). The only timing asserts
are generous bounds (10x the configured timeout) on calls that would otherwise hang.
"""
from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

pytest.importorskip("redis", reason="the redis Python package is not installed (pip install redis hiredis)")

from hstore.tiers.remote import RedisTier  # noqa: E402
from tests.helpers.redis_servers import free_port  # noqa: E402
from tests.helpers.remote import blob  # noqa: E402

TIMEOUT_S = 0.3
FAST = dict(socket_timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S, backoff_max_s=0.5)
BOUND_S = 10 * TIMEOUT_S
LOGGER = "hstore.tiers.remote"


@pytest.fixture
def fast_tier(open_tier):
    """`fast_tier(url, **fields)`: a tier with short timeouts and backoff, closed at teardown."""
    return lambda url, **fields: open_tier(url, **{**FAST, **fields})


def _written(tier: RedisTier, n: int, nbytes: int, tag: bytes) -> list:
    items = [blob(b"%s-%d" % (tag, i), nbytes) for i in range(n)]
    assert all(tier.write_many(items))
    return items


def _until(predicate, timeout_s: float = 10.0) -> bool:
    """Poll `predicate` (which does real work: a write or a read) until it holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def test_killed_then_restarted_empty(fast_tier, redis_fresh, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    tier = fast_tier(redis_fresh.url())
    before = _written(tier, 8, 64 << 10, b"before")

    redis_fresh.kill()
    keys = [i.key for i in before]
    for _ in range(5):  # many calls during the outage, one warning
        reads, took = _timed(tier.read_many, keys)
        assert reads == [None] * 8 and took < BOUND_S
        writes, took = _timed(tier.write_many, before[:3])
        assert writes == [False] * 3 and took < BOUND_S
        assert tier.contains_many(keys[:2]) == [False, False]
    s = tier.stats()
    assert s["writes_dropped"] == 15 and s["dropped"]["unreachable"] == 15 and s["misses"] == 40
    assert s["errors"].get("connection", 0) >= 1 and not s["reachable"]
    assert caplog.text.count("is unreachable") == 1

    redis_fresh.start()  # same port, empty
    after = blob(b"after", 1000)
    assert _until(lambda: tier.write_many([after]) == [True]), "the tier did not reconnect"
    assert tier.read_many(keys) == [None] * 8  # the restart lost them: misses, not errors
    assert torch.equal(tier.read_many([b"after"])[0].payload, after.payload)
    assert tier.stats()["reachable"] and "reachable again" in caplog.text


def test_killed_mid_read_returns_what_it_can(fast_tier, redis_fresh):
    tier = fast_tier(redis_fresh.url())
    items = _written(tier, 48, 1 << 20, b"big")
    out: dict = {}

    def read():
        try:
            out["records"] = tier.read_many([i.key for i in items])
        except BaseException as e:  # noqa: BLE001 - the point: nothing may escape
            out["error"] = e

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.01)
    redis_fresh.kill()
    reader.join(BOUND_S)
    assert not reader.is_alive() and "error" not in out
    for it, record in zip(items, out["records"]):
        assert record is None or torch.equal(record.payload, it.payload)


def test_a_paused_server_stalls_no_caller_beyond_the_timeout(fast_tier, redis_fresh, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tier = fast_tier(redis_fresh.url())
    items = _written(tier, 4, 256 << 10, b"p")
    redis_fresh.pause()
    try:
        reads, took = _timed(tier.read_many, [i.key for i in items])
        assert reads == [None] * 4 and took < BOUND_S
        writes, took = _timed(tier.write_many, items)
        assert writes == [False] * 4 and took < BOUND_S
        assert tier.stats()["errors"].get("timeout", 0) >= 1
        # callers arriving while the breaker is open do not wait at all on the network
        _, took = _timed(tier.read_many, [items[0].key])
        assert took < BOUND_S
    finally:
        redis_fresh.resume()
    assert _until(lambda: tier.read_many([items[0].key])[0] is not None)
    assert caplog.text.count("is unreachable") == 1


def test_unreachable_at_open_is_not_an_error(fast_tier, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tier = fast_tier(f"redis://127.0.0.1:{free_port()}/0")
    assert tier.read_many([b"k"]) == [None]
    assert tier.write_many([blob(b"k", 10)]) == [False]
    assert "not reachable" in caplog.text and not tier.stats()["reachable"]


def test_allkeys_lru_evictions_are_plain_misses(fast_tier, redis_lru_server, namespace):
    tier = fast_tier(redis_lru_server.url(), namespace=namespace, socket_timeout_s=5.0)
    items = [blob(b"lru-%d" % i, 512 << 10) for i in range(48)]  # 24 MiB through an 8 MiB server
    for start in range(0, len(items), 4):
        assert all(tier.write_many(items[start : start + 4]))
    records = tier.read_many([i.key for i in items])
    hits = [r for r in records if r is not None]
    assert 0 < len(hits) < len(items)
    for it, record in zip(items, records):
        assert record is None or torch.equal(record.payload, it.payload)
    s = tier.stats()
    assert s["errors"] == {} and s["writes_dropped"] == 0 and s["misses"] == len(items) - len(hits)
    assert redis_lru_server.client().info("stats")["evicted_keys"] > 0
    tier.clear()


def test_out_of_memory_with_noeviction_drops_writes_with_one_warning(fast_tier, redis_lru_server, namespace, caplog):
    raw = redis_lru_server.client()
    raw.flushall()
    raw.config_set("maxmemory-policy", "noeviction")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    try:
        tier = fast_tier(redis_lru_server.url(), namespace=namespace, socket_timeout_s=5.0)
        kept = blob(b"kept", 1 << 20)
        assert tier.write_many([kept]) == [True]
        results = []
        for i in range(6):
            results += tier.write_many([blob(b"oom-%d-%d" % (i, j), 1 << 20) for j in range(4)])
        assert not all(results)
        s = tier.stats()
        assert s["dropped"]["oom"] == results.count(False) and s["errors"]["oom"] == results.count(False)
        assert s["reachable"]  # a full server is up: reads go on
        assert torch.equal(tier.read_many([b"kept"])[0].payload, kept.payload)
        assert caplog.text.count("out of memory") == 1
    finally:
        raw.flushall()
        raw.config_set("maxmemory-policy", "allkeys-lru")

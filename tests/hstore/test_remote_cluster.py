"""The remote tier on a real three-node Redis Cluster (redis-cli --cluster create, no replicas)."""
from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("redis", reason="the redis Python package is not installed (pip install redis hiredis)")

from hstore.tiers.remote import RedisTier, RemoteConfig  # noqa: E402
from tests.helpers.redis_servers import free_port  # noqa: E402
from tests.helpers.remote import blob, item, tensor_of  # noqa: E402
from tests.helpers.store import ALL_DTYPES, assert_same, random_tensor  # noqa: E402

TIMEOUT_S = 0.3


@pytest.fixture
def tier(redis_cluster, namespace):
    tier = RedisTier(RemoteConfig(redis_cluster.url, namespace=namespace, socket_timeout_s=TIMEOUT_S,
                                  connect_timeout_s=TIMEOUT_S, backoff_max_s=0.5))
    yield tier
    tier.close()


def _keys_per_node(cluster, namespace: str) -> list[set[bytes]]:
    prefix = f"{namespace}:".encode()
    out = []
    for node in cluster.nodes:
        with node.client() as c:
            out.append({k[len(prefix):] for k in c.scan_iter(match=prefix + b"*", count=1000)})
    return out


def test_keys_spread_over_all_three_primaries_and_round_trip(tier, redis_cluster, namespace):
    gen = torch.Generator().manual_seed(3)
    tensors = {b"t-%d" % i: random_tensor(gen, ALL_DTYPES[i % len(ALL_DTYPES)], (i % 5 + 1, 3)) for i in range(300)}
    assert tier.write_many([item(k, t) for k, t in tensors.items()]) == [True] * 300
    per_node = _keys_per_node(redis_cluster, namespace)
    assert all(len(keys) > 50 for keys in per_node), [len(k) for k in per_node]
    assert set().union(*per_node) == set(tensors) and sum(map(len, per_node)) == 300
    for (key, want), record in zip(tensors.items(), tier.read_many(list(tensors))):
        assert_same(tensor_of(record), want)
    s = tier.stats()
    assert s["mode"] == "cluster" and len(s["servers"]) == 3 and s["reachable"]
    assert tier.contains_many([b"t-1", b"nope"]) == [True, False]
    tier.delete_many(list(tensors)[:100])
    assert sum(tier.contains_many(list(tensors))) == 200
    assert tier.clear() == 200


def test_a_paused_primary_costs_only_its_own_keys(tier, redis_cluster, namespace):
    items = [blob(b"p-%d" % i, 32 << 10) for i in range(60)]
    assert all(tier.write_many(items))
    on_paused = _keys_per_node(redis_cluster, namespace)[0]
    assert on_paused
    paused = redis_cluster.nodes[0]
    paused.pause()
    try:
        start = time.monotonic()
        records = tier.read_many([i.key for i in items])
        assert time.monotonic() - start < 10 * TIMEOUT_S
        for it, record in zip(items, records):
            assert (record is None) == (it.key in on_paused)
        written = tier.write_many(items)
        assert [not ok for ok in written] == [it.key in on_paused for it in items]
        assert tier.stats()["errors"].get("timeout", 0) >= 1
    finally:
        paused.resume()
    deadline = time.monotonic() + 10
    while None in tier.read_many([i.key for i in items]):
        assert time.monotonic() < deadline, "the paused primary's keys did not come back"
        time.sleep(0.05)
    tier.clear()


def test_a_cluster_over_tls(redis_tls_cluster, namespace):
    with RedisTier(RemoteConfig(redis_tls_cluster.url, namespace=namespace)) as tier:
        items = [blob(b"tls-%d" % i, 64 << 10) for i in range(30)]
        assert all(tier.write_many(items))
        assert all(torch.equal(r.payload, i.payload) for r, i in zip(tier.read_many([i.key for i in items]), items))
        assert len(tier.stats()["servers"]) == 3 and tier.clear() == 30


def test_seed_list_with_a_dead_node(redis_cluster, namespace):
    live = redis_cluster.nodes[1].port
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{live}?namespace={namespace}"
    tier = RedisTier(RemoteConfig(url, connect_timeout_s=TIMEOUT_S))
    try:
        assert tier.write_many([item(b"k", torch.ones(2))]) == [True]
        assert tier.read_many([b"k"])[0] is not None
        tier.clear()
    finally:
        tier.close()


def test_an_unreachable_cluster_at_open_misses_until_it_is_there(namespace):
    tier = RedisTier(RemoteConfig(f"redis+cluster://127.0.0.1:{free_port()}", namespace=namespace,
                                  connect_timeout_s=TIMEOUT_S))
    try:
        assert tier.read_many([b"k"]) == [None] and tier.write_many([item(b"k", torch.ones(1))]) == [False]
        s = tier.stats()
        assert not s["reachable"] and s["dropped"] == {"unreachable": 1}
    finally:
        tier.close()

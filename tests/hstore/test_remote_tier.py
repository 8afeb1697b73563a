"""The Redis remote tier against real standalone servers: round trips, namespaces, integrity, security."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("redis", reason="the redis Python package is not installed (pip install redis hiredis)")

from hstore.errors import StoreClosedError, StoreConfigError  # noqa: E402
from hstore.tiers.remote import RedisTier, RemoteConfig  # noqa: E402
from tests.helpers.redis_servers import (  # noqa: E402
    ACL_NAMESPACE,
    ACL_PASSWORD,
    ACL_USER,
    DEFAULT_PASSWORD,
    MINIMAL_ACL,
)
from tests.helpers.remote import blob, item, tensor_of  # noqa: E402
from tests.helpers.store import ALL_DTYPES, assert_same, random_tensor  # noqa: E402


@pytest.fixture
def tier(open_tier, redis_server, namespace):
    return open_tier(redis_server.url(), namespace=namespace)


def test_every_dtype_and_shape_round_trips(tier):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{dtype}-{shape}".encode(): random_tensor(gen, dtype, shape)
               for dtype in ALL_DTYPES for shape in [(), (0,), (5,), (3, 4), (2, 3, 2)]}
    assert tier.write_many([item(k, t) for k, t in tensors.items()]) == [True] * len(tensors)
    records = tier.read_many(list(tensors))
    for (key, want), record in zip(tensors.items(), records):
        assert_same(tensor_of(record), want)
    s = tier.stats()
    assert s["hits"] == len(tensors) and s["misses"] == 0 and s["errors"] == {}
    assert s["bytes_written"] == s["bytes_read"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_chunk_sized_values_and_big_batches(tier, open_tier, redis_server, namespace):
    items = [blob(b"chunk-%d" % i, n) for i, n in enumerate([256 << 10, 1 << 20, 8 << 20, 3 << 20, 1])]
    assert all(tier.write_many(items))
    for it, record in zip(items, tier.read_many([i.key for i in items])):
        assert torch.equal(record.payload, it.payload)
    s = tier.stats()
    assert s["read_gbps"] > 0 and s["write_gbps"] > 0 and s["latency"]["read"]["p99_ms"] > 0
    # a batch larger than a pipeline goes out in several
    small = open_tier(redis_server.url(), namespace=namespace, pipeline_bytes=1 << 16)
    many = [blob(b"many-%d" % i, 40 << 10) for i in range(40)]
    assert all(small.write_many(many))
    assert all(r is not None for r in small.read_many([i.key for i in many]))
    assert small.stats()["latency"]["write"]["batches"] >= 20


def test_misses_contains_and_deletes(tier):
    a, b = item(b"a", torch.arange(10)), item(b"b", torch.ones(3))
    assert tier.write_many([a, b]) == [True, True]
    assert tier.contains_many([b"a", b"b", b"c"]) == [True, True, False]
    assert [r is not None for r in tier.read_many([b"c", b"a"])] == [False, True]
    tier.delete_many([b"a", b"c"])
    assert tier.contains_many([b"a", b"b"]) == [False, True]
    s = tier.stats()
    assert (s["hits"], s["misses"], s["deletes"]) == (1, 1, 1)
    assert s["reachable"] and s["mode"] == "standalone" and list(s["servers"].values()) == ["up"]
    assert tier.read_many([]) == [] and tier.write_many([]) == [] and tier.contains_many([]) == []


def test_same_key_written_twice_by_two_nodes_is_harmless(open_tier, redis_server, namespace):
    one, two = (open_tier(redis_server.url(), namespace=namespace) for _ in range(2))
    t = torch.randn(64)
    assert one.write_many([item(b"k", t)]) == two.write_many([item(b"k", t)]) == [True]
    assert_same(tensor_of(two.read_many([b"k"])[0]), t)
    assert_same(tensor_of(one.read_many([b"k"])[0]), t)


def test_namespaces_are_isolated_and_nothing_outside_is_touched(open_tier, redis_server, namespace):
    raw = redis_server.client()
    raw.set(b"foreign", b"not ours")
    raw.set(f"{namespace}x:k".encode(), b"a neighbour namespace with a longer name")
    a = open_tier(redis_server.url(), namespace=namespace)
    b = open_tier(redis_server.url(query=f"namespace={namespace}-b"))
    assert a.write_many([item(b"k", torch.zeros(4))]) == [True]
    assert b.read_many([b"k"]) == [None] and b.contains_many([b"k"]) == [False]
    b.delete_many([b"k"])
    assert a.contains_many([b"k"]) == [True]
    assert a.read_many([b"foreign"]) == [None]
    assert b.clear() == 0 and a.clear() == 1
    assert raw.get(b"foreign") == b"not ours" and raw.exists(f"{namespace}x:k") == 1
    assert raw.keys(f"{namespace}:*") == []


def test_a_corrupted_value_is_a_miss_counted_and_deleted(tier, redis_server, namespace, caplog):
    raw = redis_server.client()
    t = torch.randn(1000)
    assert tier.write_many([item(b"flip", t), item(b"cut", t), item(b"swap", torch.ones(3)),
                            item(b"other", torch.zeros(3))]) == [True] * 4
    rkey = lambda k: f"{namespace}:{k}".encode()  # noqa: E731
    byte = raw.getrange(rkey("flip"), 2000, 2000)
    raw.setrange(rkey("flip"), 2000, bytes([byte[0] ^ 0x10]))  # one bit of the payload
    raw.set(rkey("cut"), raw.get(rkey("cut"))[:-7])  # truncated
    raw.set(rkey("swap"), raw.get(rkey("other")))  # another key's (valid) record
    raw.hset(rkey("wrongtype"), "f", "v")  # not a string at all
    caplog.set_level(logging.WARNING, logger="hstore.tiers.remote")
    assert tier.read_many([b"flip", b"cut", b"swap", b"wrongtype", b"other"])[:4] == [None] * 4
    s = tier.stats()
    assert s["errors"]["corrupt"] == 4 and s["corrupt_deleted"] == 4 and s["hits"] == 1
    assert [raw.exists(rkey(k)) for k in ("flip", "cut", "swap", "wrongtype", "other")] == [0, 0, 0, 0, 1]
    assert caplog.text.count("failed its check") == 4


def test_a_value_of_a_newer_format_is_a_miss_but_left_alone(tier, redis_server, namespace):
    raw = redis_server.client()
    assert tier.write_many([item(b"k", torch.ones(2))]) == [True]
    rkey = f"{namespace}:k".encode()
    raw.setrange(rkey, 4, b"\x09")  # the format version byte
    assert tier.read_many([b"k"]) == [None]
    assert tier.stats()["errors"] == {"newer_format": 1} and raw.exists(rkey)


def test_ttl_expires_values(open_tier, redis_server, namespace):
    tier = open_tier(redis_server.url(query="ttl=30"), namespace=namespace)
    tier.write_many([item(b"k", torch.ones(1))])
    assert 0 < redis_server.client().pttl(f"{namespace}:k") <= 30_000


def test_a_closed_tier_refuses_calls(open_tier, redis_server):
    tier = open_tier(redis_server.url())
    tier.close()
    tier.close()
    with pytest.raises(StoreClosedError):
        tier.read_many([b"k"])


# ---------------------------------------------------------------------------- security
def test_password_and_acl_credentials_from_the_url(open_tier, redis_auth_server):
    url = redis_auth_server.url(credentials=f":{DEFAULT_PASSWORD}")
    t = torch.arange(6)
    assert open_tier(url).write_many([item(b"k", t)]) == [True]
    alice = open_tier(redis_auth_server.url(credentials=f"{ACL_USER}:{ACL_PASSWORD}"), namespace=ACL_NAMESPACE)
    assert alice.write_many([item(b"k", t)]) == [True]
    assert_same(tensor_of(alice.read_many([b"k"])[0]), t)
    assert "alice:***@" in repr(alice) and ACL_PASSWORD not in repr(alice) + repr(alice.stats())


def test_a_user_with_only_the_data_path_commands_can_use_the_tier(open_tier, redis_auth_server):
    user, password, ns, _ = MINIMAL_ACL
    carol = open_tier(redis_auth_server.url(credentials=f"{user}:{password}"), namespace=ns)
    t = torch.randn(5)
    assert carol.write_many([item(b"k", t)]) == [True] and carol.contains_many([b"k"]) == [True]
    assert_same(tensor_of(carol.read_many([b"k"])[0]), t)
    carol.delete_many([b"k"])
    assert carol.read_many([b"k"]) == [None] and carol.stats()["errors"] == {}


@pytest.mark.parametrize("credentials, namespace, says", [
    ("", None, "authentication failed"),
    (":wrong", None, "authentication failed"),
    (f"{ACL_USER}:wrong", ACL_NAMESPACE, "authentication failed"),
    (f"nobody:{ACL_PASSWORD}", None, "authentication failed"),
    (f"{ACL_USER}:{ACL_PASSWORD}", "bob", "may not read keys of namespace 'bob'"),
])
def test_wrong_credentials_fail_at_open_with_a_clear_error(redis_auth_server, credentials, namespace, says, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = RemoteConfig(redis_auth_server.url(credentials=credentials), namespace=namespace)
    with pytest.raises(StoreConfigError, match=says) as e:
        RedisTier(cfg)
    assert "wrong" not in str(e.value) and ACL_PASSWORD not in str(e.value) + caplog.text


def test_wrong_mode_and_database_fail_at_open(redis_server, redis_cluster):
    with pytest.raises(StoreConfigError, match="not a Redis Cluster"):
        RedisTier(redis_server.url(scheme="redis+cluster").rsplit("/", 1)[0])
    with pytest.raises(StoreConfigError, match="is a Redis Cluster node"):
        RedisTier(redis_cluster.nodes[0].url())
    with pytest.raises(StoreConfigError, match="database 4000 does not exist"):
        RedisTier(redis_server.url().rsplit("/", 1)[0] + "/4000")


def test_tls_round_trip(open_tier, redis_tls_server, namespace):
    ca = redis_tls_server.tls.cert
    tier = open_tier(redis_tls_server.url(query=f"ssl_ca_certs={ca}"), namespace=namespace)
    items = [blob(b"tls-%d" % i, n) for i, n in enumerate([10, 1 << 20])]
    assert all(tier.write_many(items))
    assert [torch.equal(r.payload, i.payload) for r, i in zip(tier.read_many([i.key for i in items]), items)] == [
        True, True]
    insecure = open_tier(redis_tls_server.url(query="ssl_cert_reqs=none"), namespace=namespace)
    assert insecure.contains_many([b"tls-0"]) == [True]


def test_tls_with_an_untrusted_certificate_reads_nothing(open_tier, redis_tls_server, caplog):
    """Without the CA the handshake fails: not a credentials problem, so the tier opens and misses."""
    caplog.set_level(logging.WARNING)
    tier = open_tier(redis_tls_server.url())
    assert tier.read_many([b"k"]) == [None] and not tier.stats()["reachable"]
    assert "not reachable" in caplog.text

"""TieredStore with a remote tier: nodes with their own roots sharing state through one real Redis."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("redis", reason="the redis Python package is not installed (pip install redis hiredis)")

from hstore import StoreConfig, TieredStore  # noqa: E402
from hstore.errors import StoreConfigError  # noqa: E402
from hstore.tiers.remote import RedisTier, RemoteConfig  # noqa: E402
from tests.helpers.redis_servers import DEFAULT_PASSWORD  # noqa: E402
from tests.helpers.store import STORE_DEFAULTS, assert_same, check_keyed, keyed_tensor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FAST = "socket_timeout=0.3&connect_timeout=0.3&backoff_max=0.5"
KEYS = [f"shared-{i}" for i in range(12)]

_NODE_A = """
import sys
from hstore import StoreConfig, TieredStore
from tests.helpers.store import STORE_DEFAULTS, keyed_tensor
root, url, *keys = sys.argv[1:]
with TieredStore(StoreConfig(**{**STORE_DEFAULTS, "root": root, "remote": url})) as store:
    for key in keys:
        store.put(key, keyed_tensor(key))
    result = store.flush()
    remote = store.stats()["tiers"]["remote"]
    assert remote["writes"] == len(keys) and remote["writes_dropped"] == 0, remote
print("ok")
"""


@pytest.fixture
def open_node(tmp_path):
    """`open_node(url, name, **overrides)`: a store rooted in tmp_path/name with a remote, closed at teardown."""
    stores = []

    def make(url: str, name: str, **overrides) -> TieredStore:
        store = TieredStore(StoreConfig(**{**STORE_DEFAULTS, "root": tmp_path / name, "remote": url, **overrides}))
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def test_a_node_in_another_process_sees_what_the_first_put(open_node, tmp_path, redis_server, namespace):
    url = redis_server.url(query=f"namespace={namespace}")
    child = subprocess.run([sys.executable, "-c", _NODE_A, str(tmp_path / "node-a"), url, *KEYS],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr
    b = open_node(url, "node-b", nvme_bytes=0)  # a stateless serving node
    assert all(key in b for key in KEYS) and "nope" not in b
    check_keyed(KEYS[0], b.get(KEYS[0]))
    for key, got in zip(KEYS, b.get_many(KEYS + ["nope"])):
        check_keyed(key, got)
    outs = [torch.empty_like(keyed_tensor(k)) for k in KEYS[:4]]
    assert b.get_many_into(KEYS[:4], outs) == [True] * 4
    for key, out in zip(KEYS[:4], outs):
        check_keyed(key, out)
    s = b.stats()["tiers"]["remote"]
    assert s["hits"] >= len(KEYS) and s["bytes_read"] > 0 and s["errors"] == {}
    assert {"misses", "bytes_written", "latency", "reachable"} <= set(s)


def test_flush_returns_with_the_remote_written(open_node, redis_server, namespace):
    a = open_node(redis_server.url(query=f"namespace={namespace}"), "a")
    for key in KEYS[:3]:
        a.put(key, keyed_tensor(key))
    a.flush()
    with redis_server.client() as raw:
        assert sorted(raw.keys(f"{namespace}:*")) == sorted(f"{namespace}:{k}".encode() for k in KEYS[:3])


def test_a_dead_server_makes_flush_neither_hang_nor_raise(open_node, redis_fresh, namespace, caplog):
    url = redis_fresh.url(query=f"namespace={namespace}&{FAST}")
    a = open_node(url, "a")
    b = open_node(url, "b", nvme_bytes=0)
    a.put("before", keyed_tensor("before"))
    a.flush()
    redis_fresh.kill()
    for key in KEYS[:4]:
        a.put(key, keyed_tensor(key))
    start = time.monotonic()
    a.flush()  # NVMe has them; the remote writes are dropped and counted
    assert time.monotonic() - start < 10
    remote = a.stats()["tiers"]["remote"]
    assert remote["writes_dropped"] == 4 and not remote["reachable"]
    a.drop_cached()
    for key in KEYS[:4]:
        check_keyed(key, a.get(key))  # from NVMe
    assert b.get("before") is None and "before" not in b  # remote-only there: a miss, not an error
    redis_fresh.start()
    a.put("after", keyed_tensor("after"))
    deadline = time.monotonic() + 10
    while True:
        a.flush()
        if b.get("after") is not None or time.monotonic() > deadline:
            break
        a.put("after", keyed_tensor("after", version=1))  # dirty again: the flusher sends it again
        time.sleep(0.1)
    check_keyed("after", b.get("after"))


def test_bad_remote_urls_and_passwords_fail_at_open(tmp_path, redis_auth_server):
    for url, says in [("redis://u:hunter2@h:99999/0", "port"), ("ftp://h", "scheme"),
                      (redis_auth_server.url(credentials=":hunter2"), "authentication failed")]:
        with pytest.raises(StoreConfigError, match=says) as e:
            TieredStore(StoreConfig(**{**STORE_DEFAULTS, "root": tmp_path / "s", "remote": url}))
        assert "hunter2" not in str(e.value)
    ok = redis_auth_server.url(credentials=f":{DEFAULT_PASSWORD}")
    with TieredStore(StoreConfig(**{**STORE_DEFAULTS, "root": tmp_path / "s", "remote": ok})) as store:
        store.put("k", torch.ones(3))
        store.flush()
        assert store.stats()["tiers"]["remote"]["writes"] == 1


def test_the_config_parses_the_url_and_hides_the_password(tmp_path):
    cfg = StoreConfig(root=tmp_path, remote="rediss://alice:hunter2@h:1/0?namespace=prod")
    assert isinstance(cfg.remote, RemoteConfig) and cfg.remote.namespace == "prod"
    assert "hunter2" not in repr(cfg) and "alice:***@" in repr(cfg)
    assert StoreConfig(root=tmp_path, remote=cfg.remote).remote is cfg.remote


def test_a_tier_instance_is_the_callers(tmp_path, redis_server, namespace):
    tier = RedisTier(redis_server.url(query=f"namespace={namespace}"))
    with TieredStore(StoreConfig(**{**STORE_DEFAULTS, "root": tmp_path / "s", "remote": tier})) as store:
        store.put("k", torch.arange(5))
        store.flush()
    assert_same(tier.read_many([b"k"])[0].payload.view(torch.int64), torch.arange(5))  # still open
    tier.close()

"""The store's use of a remote tier, against the in-process DictRemoteTier of hstore.testing
(the Redis tier's own tests use real servers): two stores sharing one remote see each other's
values through every read call; a stateless node (no NVMe) writes only there; a remote that is
away, full or holds a bad value is a miss and a counted drop, never an error or a hang."""
from __future__ import annotations

import pytest
import torch

from hstore import StoreConfig, StoreConfigError, TieredStore
from hstore.testing import DictRemoteTier
from tests.helpers.store import STORE_DEFAULTS, assert_same, keyed_tensor

KiB = 1 << 10


@pytest.fixture
def remote():
    return DictRemoteTier()


def node(tmp_path, name: str, remote, **overrides) -> TieredStore:
    return TieredStore(StoreConfig(**dict(STORE_DEFAULTS, root=tmp_path / name, remote=remote, **overrides)))


def test_a_value_one_node_flushed_is_read_by_another(tmp_path, remote):
    values = {f"k{i}": keyed_tensor(f"k{i}", i) for i in range(8)}
    with node(tmp_path, "a", remote) as a:
        a.put_many(list(values.items()))
        result = a.flush()
        assert result.memory_only == ()
        assert a.stats()["bytes_shared"] == sum(v.numel() * v.element_size() for v in values.values())
    with node(tmp_path, "b", remote) as b:
        assert len(b) == 0  # nothing local
        assert "k0" in b and "nope" not in b
        assert b.locate(["k0", "nope"]) == ["remote", None]
        assert_same(b.get("k0"), values["k0"])
        assert b.locate(["k0"]) == ["dram"]  # promoted on the read
        got = b.get_many(["k1", "nope", "k2"])
        assert got[1] is None
        assert_same(got[0], values["k1"])
        assert_same(got[2], values["k2"])
        out = torch.empty_like(values["k3"])
        assert b.get_many_into(["k3"], [out], promote=False) == [True]
        assert_same(out, values["k3"])
        assert b.locate(["k3"]) == ["remote"]  # promote=False left it there
        st = b.stats()
        assert st["tiers"]["remote"]["hits"] == 4 and st["tiers"]["remote"]["misses"] == 1
        assert st["hits"] == 4 and st["misses"] == 1
        assert st["tiers"]["dram"]["misses"] >= 4 and st["tiers"]["nvme"]["misses"] >= 4


def test_a_stateless_node_writes_only_to_the_remote(tmp_path, remote):
    with node(tmp_path, "a", remote, nvme_bytes=0) as a:
        assert [t.name for t in a.tiers] == ["dram", "remote"]
        assert a.tier("remote").kind == "remote" and a.tier("nvme") is None
        a.put("k", torch.arange(10))
        result = a.flush()  # returns once the remote has it
        assert result.durable is False and result.memory_only == ()
        assert remote.keys() == [b"k"]
    with node(tmp_path, "b", remote, nvme_bytes=0) as b:
        assert_same(b.get("k"), torch.arange(10))


def test_a_remote_that_is_away_drops_writes_and_misses_reads(tmp_path, remote):
    remote.reachable = False
    with node(tmp_path, "a", remote) as a:
        a.put("k", torch.ones(4))
        a.flush()  # neither hangs nor raises
        st = a.stats()
        assert st["remote_writes_dropped"] == 1 and st["tiers"]["remote"]["dropped_writes"] == 1
        assert_same(a.get("k"), torch.ones(4))  # local tiers still hold it
        assert a.get("other") is None and "other" not in a
        assert a.locate(["other"]) == [None]
    remote.reachable = True
    with node(tmp_path, "b", remote) as b:
        assert b.get("k") is None  # it never reached the remote


def test_a_full_remote_drops_what_does_not_fit(tmp_path):
    remote = DictRemoteTier(max_items=2)
    with node(tmp_path, "a", remote) as a:
        for i in range(4):
            a.put(f"k{i}", torch.full((3,), float(i)))
        a.flush()
        assert a.stats()["remote_writes_dropped"] == 2 and len(remote.keys()) == 2


def test_a_bad_value_on_the_remote_is_a_miss(tmp_path, remote):
    with node(tmp_path, "a", remote) as a:
        a.put("k", torch.ones(100))
        a.flush()
    remote.corrupt(b"k")
    with node(tmp_path, "b", remote) as b:
        assert b.get("k") is None
        assert remote.stats()["corrupt"] == 1 and remote.keys() == []


def test_a_remote_value_that_does_not_fit_the_output_is_a_miss(tmp_path, remote):
    with node(tmp_path, "a", remote) as a:
        a.put("k", torch.ones(100))
        a.flush()
    with node(tmp_path, "b", remote) as b:
        assert b.get_many_into(["k"], [torch.empty(100, dtype=torch.float64)]) == [False]
        assert b.get_many_into(["k"], torch.empty(1, 100)) == [True]


def test_delete_removes_the_key_from_the_remote_too(tmp_path, remote):
    with node(tmp_path, "a", remote) as a:
        a.put("k", torch.ones(3))
        a.flush()
        assert a.delete("k")
        assert remote.keys() == []
        assert "k" not in a


def test_a_local_put_wins_over_a_remote_read_racing_it(tmp_path, remote):
    with node(tmp_path, "a", remote) as a:
        a.put("k", torch.ones(3))
        a.flush()
    with node(tmp_path, "b", remote) as b:
        b.put("k", torch.zeros(3))  # local value first: the remote's is never read
        assert_same(b.get("k"), torch.zeros(3))


def test_remote_must_be_a_remote_tier(tmp_path):
    with pytest.raises(StoreConfigError, match="remote"):
        StoreConfig(root=tmp_path, remote=42)
    with pytest.raises(StoreConfigError, match="scheme"):  # URLs are the Redis tier's (test_remote_store.py)
        StoreConfig(root=tmp_path, remote="http://127.0.0.1:1/0")

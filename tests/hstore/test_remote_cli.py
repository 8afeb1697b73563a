"""`hstore stats --remote` and `hstore bench --remote` against a real server."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("redis", reason="the redis Python package is not installed (pip install redis hiredis)")

from hstore import StoreConfig, TieredStore  # noqa: E402
from hstore.cli import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, main  # noqa: E402
from hstore.tiers.remote import RedisTier  # noqa: E402
from tests.helpers.redis_servers import DEFAULT_PASSWORD, free_port  # noqa: E402
from tests.helpers.remote import blob  # noqa: E402


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_remote_alone_and_beside_a_store(capsys, tmp_path, redis_server, namespace):
    url = redis_server.url(query=f"namespace={namespace}")
    tier = RedisTier(url)
    try:
        assert all(tier.write_many([blob(b"a", 1000), blob(b"b", 3000)]))
    finally:
        tier.close()
    code, out, _ = run(capsys, "stats", "--remote", url)
    assert code == EXIT_OK and f"namespace '{namespace}'" in out and "namespace 2 keys" in out
    assert "allkeys-lru" in out  # the session server has no maxmemory: the advice shows
    code, out, _ = run(capsys, "stats", "--remote", url, "--json")
    (server,) = json.loads(out)["remote"]["servers"]
    assert code == EXIT_OK and server["namespace_keys"] == 2 and server["namespace_value_bytes"] > 4000

    root = tmp_path / "store"
    with TieredStore(StoreConfig(root=root, dram_bytes=1 << 20, nvme_bytes=4 << 20, io_engine="threads")) as s:
        s.put("k", torch.ones(4))
    code, out, _ = run(capsys, "stats", root, "--remote", url, "--json")
    doc = json.loads(out)
    assert code == EXIT_OK and doc["items"] == 1 and doc["remote"]["servers"][0]["namespace_keys"] == 2
    code, out, _ = run(capsys, "stats", root, "--remote", url)
    assert code == EXIT_OK and "store " in out and "remote " in out


def test_stats_remote_errors_are_one_line(capsys, redis_auth_server):
    code, _, err = run(capsys, "stats", "--remote", redis_auth_server.url(credentials=":nope-not-it"))
    assert code == EXIT_PROBLEMS and "authentication failed" in err and "nope-not-it" not in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "stats", "--remote", "http://u:secret@x")
    assert code == EXIT_USAGE and "scheme" in err and "secret" not in err
    code, out, _ = run(capsys, "stats", "--remote", f"redis://127.0.0.1:{free_port()}/0?connect_timeout=0.2")
    assert code == EXIT_OK and "unreachable" in out
    assert run(capsys, "stats")[0] == EXIT_USAGE


def test_bench_remote_reports_both_sides(capsys, redis_auth_server):
    url = redis_auth_server.url(credentials=f":{DEFAULT_PASSWORD}")
    code, out, err = run(capsys, "bench", "--remote", url, "--sizes", "64K,256K", "--total", "1M",
                         "--repeat", "1", "--no-progress", "--json")
    assert code == EXIT_OK, err
    doc = json.loads(out)
    assert [r["chunk_bytes"] for r in doc["rows"]] == [64 << 10, 256 << 10]
    for r in doc["rows"]:
        assert r["tier_write_gbps"] > 0 and r["raw_get_gbps"] > 0 and r["read_ratio"] > 0
    assert DEFAULT_PASSWORD not in out and "***" in doc["remote"]
    with redis_auth_server.client() as c:
        assert not any(k.startswith(b"hstore-bench-") for k in c.keys())  # it cleaned up
    code, out, _ = run(capsys, "bench", "--remote", url, "--sizes", "64K", "--total", "128K", "--repeat", "1",
                       "--no-progress")
    assert code == EXIT_OK and "ratio" in out and "64K" in out
    assert run(capsys, "bench", "--tiers", "dram")[0] == EXIT_USAGE

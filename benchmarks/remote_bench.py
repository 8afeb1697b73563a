"""`hstore bench --remote` against servers this script starts, deployed as the README says.

    python3 benchmarks/remote_bench.py [--cluster] [--total 512M] [--repeat 5] [--out DIR]

Starts a local redis-server (maxmemory 4x the run's bytes, allkeys-lru, no persistence; with
--cluster, three of them joined by redis-cli --cluster create), measures the remote tier's
write/read GB/s for 256 KiB-8 MiB chunks next to plain redis-py SET/GET of the same sizes in
the same run, prints the table and writes it as JSON to DIR (default ./gpu-out), then stops the
servers. On the GPU machine: pack with `bash ../shared/device/pack.sh hiredis` (redis-server
and redis-py come with the pack; hiredis is what the README's figures assume), then
`source .devdeps/install.sh && python3 benchmarks/remote_bench.py`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hstore.units import parse_size  # noqa: E402
from hstore_bench.remote import DEFAULT_SIZES, RemoteBenchConfig, format_rows, run_remote_bench  # noqa: E402
from tests.helpers.redis_servers import RedisServer, ThreeNodeCluster  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", action="store_true", help="a three-node cluster instead of one server")
    ap.add_argument("--total", type=parse_size, default=parse_size("512M"), help="bytes per measurement")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("gpu-out"))
    args = ap.parse_args()
    memory = ["--maxmemory", str(4 * args.total), "--maxmemory-policy", "allkeys-lru"]
    with tempfile.TemporaryDirectory(prefix="hstore-remote-bench-") as tmp:
        if args.cluster:
            servers = ThreeNodeCluster(Path(tmp))
            for node in servers.nodes:
                node.args += memory
            url = servers.start().url
        else:
            servers = RedisServer(Path(tmp), args=memory).start()
            url = servers.url()
        try:
            rows = run_remote_bench(RemoteBenchConfig(url, sizes=DEFAULT_SIZES, total=args.total,
                                                      repeat=args.repeat))
        finally:
            servers.stop()
    print(format_rows(url, rows))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "remote_bench_cluster.json" if args.cluster else "remote_bench.json"
    (args.out / name).write_text(json.dumps({"url": url, "rows": [r.as_dict() for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `hstore` command, run in-process through `main([...])` (and once as a subprocess,
where a second process must hold the store): help and usage errors, `stats` on a
real store, `verify` against corruption planted in the data file, and a tiny
`bench` whose table and CSV are parsed. No timing is asserted.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hstore import StoreConfig, TieredStore
from hstore.units import format_size, parse_size
from hstore_bench import CSV_COLUMNS
from hstore.buffers import align_up
from hstore.cli import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, main
from hstore.index import Index
from hstore.ondisk import existing_config
from hstore.record import HEADER_BYTES
from hstore.format import DATA_FILE

_MiB = 1 << 20


@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


def make_store(root, items: dict[str, torch.Tensor], **overrides) -> None:
    cfg = dict(root=root, dram_bytes=2 * _MiB, nvme_bytes=8 * _MiB, io_engine="threads", io_threads=2,
               queue_depth=16)
    cfg.update(overrides)
    with TieredStore(StoreConfig(**cfg)) as store:
        for k, v in items.items():
            store.put(k, v)
        store.flush()


def sample_items() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "layer/0": torch.randn(64, 128, generator=g),  # 32 KiB float32
        "layer/1": torch.randn(64, 128, generator=g).half(),
        "layer/2": torch.randn(64, 128, generator=g).half(),
        "tiny": torch.arange(5, dtype=torch.int64),  # less than a page: payload ends in a tail block
    }


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- help, version, usage
def test_help_lists_commands_and_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == EXIT_OK
    for word in ("stats", "verify", "bench", "--version", "exit status"):
        assert word in out
    for cmd in ("stats", "verify", "bench"):
        code, out, _ = run(capsys, cmd, "--help")
        assert code == EXIT_OK and f"hstore {cmd}" in out and "ROOT" in out
    code, out, _ = run(capsys, "bench", "--help")
    for opt in ("--sizes", "--total", "--tiers", "--engine", "--queue-depth", "--repeat", "--csv"):
        assert opt in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == EXIT_OK and out.startswith("hstore ") and out.strip() != "hstore"


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["stats"],
    ["bench", "X", "--sizes", "3Q"],
    ["bench", "X", "--tiers", "tape"],
    ["bench", "X", "--repeat", "0"],
    ["bench", "X", "--total", "1M", "--sizes", "2M"],
])
def test_usage_errors_exit_2(capsys, tmp_path, argv):
    argv = [str(tmp_path / "b") if a == "X" else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert "error" in err and "Traceback" not in err


def test_missing_or_foreign_root_is_a_usage_error(capsys, tmp_path):
    for cmd in ("stats", "verify"):
        code, _, err = run(capsys, cmd, tmp_path / "nope")
        assert code == EXIT_USAGE and "no such directory" in err and "Traceback" not in err
        code, _, err = run(capsys, cmd, tmp_path)
        assert code == EXIT_USAGE and "not an hstore store" in err
    assert not (tmp_path / "nope").exists() and not (tmp_path / "index").exists()  # nothing was created


def test_sizes_parse_and_format():
    assert parse_size("512K") == 512 * 1024
    assert parse_size("8m") == 8 * _MiB
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("4096") == 4096
    assert parse_size("1.5M") == 3 * 512 * 1024
    for bad in ("", "K", "-1M", "0", "1.3K", "2X"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert [format_size(n) for n in (512 * 1024, 8 * _MiB, 1 << 30, 1000)] == ["512K", "8M", "1G", "1000"]


# ---------------------------------------------------------------------------- stats
def test_stats_on_a_fresh_store(capsys, root):
    items = sample_items()
    make_store(root, items)
    code, out, err = run(capsys, "stats", root, "--json")
    assert code == EXIT_OK, err
    s = json.loads(out)
    assert s["items"] == len(items) and s["index_records"] == len(items)
    assert s["payload_bytes"] == sum(t.numel() * t.element_size() for t in items.values())
    assert s["in_use"] is False
    assert s["dtypes"] == {
        "float16": {"items": 2, "bytes": 2 * 64 * 128 * 2},
        "float32": {"items": 1, "bytes": 64 * 128 * 4},
        "int64": {"items": 1, "bytes": 40},
    }
    (dev,) = s["devices"]
    assert dev["exists"] and dev["file_bytes"] == 8 * _MiB and dev["items"] == len(items)
    assert dev["stored_bytes"] == sum(HEADER_BYTES + align_up(t.numel() * t.element_size()) for t in items.values())
    assert dev["free_in_file_bytes"] == 8 * _MiB - dev["stored_bytes"] and dev["fs_free_bytes"] > 0
    assert s["oldest"]["key"] == "layer/0" and s["newest"]["key"] == "tiny"
    assert s["smallest_item_bytes"] == 40 and s["largest_item_bytes"] == 64 * 128 * 4

    code, out, _ = run(capsys, "stats", root)
    assert code == EXIT_OK
    assert "items        4" in out and "float16" in out and DATA_FILE in out and "not open" in out


def test_stats_on_an_empty_store_without_nvme(capsys, root):
    make_store(root, {}, nvme_bytes=0)
    code, out, _ = run(capsys, "stats", root, "--json")
    s = json.loads(out)
    assert code == EXIT_OK and s["items"] == 0 and s["devices"] == [] and s["oldest"] is None


def test_stats_while_another_process_holds_the_store(root):
    """stats takes no lock (it works beside a writer); verify needs the lock and says who has it."""
    make_store(root, sample_items())
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from hstore import StoreConfig, TieredStore
            cfg = StoreConfig(root={str(root)!r}, dram_bytes=2 << 20, nvme_bytes=8 << 20, io_engine="threads")
            with TieredStore(cfg):
                print("open", flush=True)
                sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        cli = [sys.executable, "-m", "hstore.cli"]
        stats = subprocess.run(cli + ["stats", str(root), "--json"], capture_output=True, text=True, timeout=60)
        assert stats.returncode == EXIT_OK, stats.stderr
        s = json.loads(stats.stdout)
        assert s["items"] == 4 and s["in_use"] and s["in_use_by_pid"] == holder.pid
        verify = subprocess.run(cli + ["verify", str(root), "--no-progress"], capture_output=True, text=True,
                                timeout=60)
        assert verify.returncode == EXIT_PROBLEMS
        assert "open in another process" in verify.stderr and f"pid {holder.pid}" in verify.stderr
        assert "Traceback" not in verify.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


# ---------------------------------------------------------------------------- verify
def record_of(root, key: bytes):
    index = Index(root / "index", readonly=True)
    try:
        return next(e for e in index.items() if e.key == key)
    finally:
        index.close()


def flip_bytes(path, offset: int, n: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
        f.flush()
        os.fsync(f.fileno())


def test_existing_config_recovers_the_layout(root):
    make_store(root, sample_items(), nvme_bytes=12 * _MiB, nvme_dirs=[root.parent / "ssd0", root.parent / "ssd1"])
    cfg = existing_config(root)
    assert [p.resolve() for p in cfg.nvme_dirs] == [(root.parent / d).resolve() for d in ("ssd0", "ssd1")]
    assert cfg.nvme_bytes == 12 * _MiB and cfg.gpu_bytes == 0 and cfg.pin_dram is False
    assert existing_config(root, queue_depth=8).queue_depth == 8


@pytest.mark.parametrize("where", ["payload", "header", "tail"])
def test_verify_finds_planted_corruption_and_repair_removes_it(capsys, root, where):
    items = sample_items()
    make_store(root, items)
    code, out, err = run(capsys, "verify", root, "--no-progress")
    assert code == EXIT_OK, err
    assert "checked 4 items" in out and "4 ok, 0 corrupt, 0 unreadable" in out

    key = b"tiny" if where == "tail" else b"layer/1"
    e = record_of(root, key)
    offset = e.offset + (HEADER_BYTES + 8 if where in ("payload", "tail") else 16)
    flip_bytes(root / "nvme" / DATA_FILE, offset, 8)

    code, out, _ = run(capsys, "verify", root, "--no-progress", "--json")
    assert code == EXIT_PROBLEMS
    report = json.loads(out)
    assert (report["items"], report["ok"], report["corrupt"], report["unreadable"]) == (4, 3, 1, 0)
    assert report["corrupt_keys"] == [key.decode()] and report["repaired"] == 0
    code, out, _ = run(capsys, "verify", root, "--no-progress")  # without --repair nothing changed
    assert code == EXIT_PROBLEMS and f"corrupt: {key.decode()}" in out and "--repair" in out

    code, out, _ = run(capsys, "verify", root, "--repair", "--no-progress")
    assert code == EXIT_PROBLEMS and "deleted 1 bad entries" in out
    code, out, _ = run(capsys, "verify", root, "--no-progress")
    assert code == EXIT_OK and "3 ok, 0 corrupt" in out

    with TieredStore(existing_config(root)) as store:
        assert key not in store and len(store) == 3
        for k, v in items.items():
            if k.encode() != key:
                assert torch.equal(store.get(k), v)


def test_verify_reports_index_entries_outside_the_data_file(capsys, root):
    """A data file cut short: the records past its end cannot be read, and the store drops
    their index entries when it opens; verify reports them and exits 1."""
    make_store(root, sample_items())
    path = root / "nvme" / DATA_FILE
    e = record_of(root, b"layer/2")
    os.truncate(path, e.offset + HEADER_BYTES)  # layer/2's payload and the records after it are gone
    size = os.path.getsize(path)
    code, out, _ = run(capsys, "verify", root, "--no-progress", "--json")
    report = json.loads(out)
    assert code == EXIT_PROBLEMS
    assert report["ok"] == 2 and report["corrupt"] == 0
    assert sorted(report["dropped_at_open_keys"]) == ["layer/2", "tiny"]
    assert os.path.getsize(path) == size  # verify never grows or shrinks a data file
    code, out, _ = run(capsys, "verify", root, "--no-progress")
    assert code == EXIT_OK and "2 ok" in out


def test_verify_progress_bar_goes_to_stderr(capsys, root):
    make_store(root, sample_items())
    code, out, err = run(capsys, "verify", root)
    assert code == EXIT_OK and "verify" in err and "100%" in err and out.startswith("checked 4 items")


# ---------------------------------------------------------------------------- bench
def test_bench_tiny_prints_table_and_csv(capsys, tmp_path):
    base = os.environ.get("HSTORE_TEST_DIR") or str(tmp_path)
    bench_root = os.path.join(base, f"bench-{os.getpid()}")
    csv_path = tmp_path / "bench.csv"
    code, out, err = run(capsys, "bench", bench_root, "--total", "8M", "--sizes", "256K,1M", "--repeat", "1",
                         "--csv", csv_path, "--no-progress")
    assert code == EXIT_OK, err
    assert not os.path.exists(bench_root)  # created for the run, removed with everything in it
    for word in ("cpu", "root", "gpu", "tier", "chunk", "write GB/s", "read GB/s", "put+get GB/s", "read/ref",
                 "raw O_DIRECT", "targets", "DRAM put+get, 512K"):
        assert word in out, word

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == CSV_COLUMNS
    by = {(r["tier"], r["chunk"]): r for r in rows}
    for chunk in ("256K", "512K", "1M"):  # 512K is always measured for DRAM (the target's size)
        r = by[("dram", chunk)]
        assert float(r["write_gbps"]) > 0 and float(r["read_gbps"]) > 0 and float(r["put_get_gbps"]) > 0
        assert r["chunk_bytes"] == str(parse_size(chunk))
    for chunk in ("256K", "1M"):
        r = by[("nvme", chunk)]
        assert float(r["write_gbps"]) > 0 and float(r["read_gbps"]) > 0
        if r["reference"]:  # absent only where the directory refuses O_DIRECT
            assert float(r["ref_gbps"]) > 0 and float(r["read_vs_ref"]) > 0
    assert ("raw", "8M") in by and ("nvme", "512K") not in by
    engines = {r["engine"] for r in rows}
    assert len(engines) == 1 and engines.pop() in ("uring", "threads")
    if not torch.cuda.is_available():
        assert not any(r["tier"].startswith(("gpu", "h2d", "nvme->gpu")) for r in rows)


def test_bench_dram_only_json_keeps_an_existing_root(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    code, out, _ = run(capsys, "bench", tmp_path, "--total", "2M", "--sizes", "512K", "--repeat", "2",
                       "--tiers", "dram", "--json", "--no-progress")
    assert code == EXIT_OK
    doc = json.loads(out)
    assert [(r["tier"], r["chunk_bytes"]) for r in doc["rows"]] == [("dram", 512 * 1024)]
    assert doc["rows"][0]["repeats"] == 2 and doc["host"]["cores"] >= 1
    assert [t["name"] for t in doc["targets"]] == ["DRAM put+get, 512K chunks"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # only its own directory was removed

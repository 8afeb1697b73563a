"""`hcache bench` end to end on a CPU: the CI form of the TTFT benchmark (tiny models, few rounds).

Real models, a real store with an NVMe tier, every method's HCache. What must hold whatever the
machine: every method restores the prefix it should, the restored K/V equal the model's own (float32:
exactly), every row has its repetitions, and the CSV, markdown and plot are written.
"""
from __future__ import annotations

import csv

import pytest

from hcache_adapter.bench.ttft import ALL_METHODS
from hcache_adapter.cli import main as cli


def test_bench_runs_every_method_from_dram_and_nvme(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli(["bench", "--models", "tiny,tiny-gqa", "--contexts", "128", "--sources", "dram,nvme",
                "--nvme-contexts", "128", "--repeat", "2", "--warmup", "1", "--long-repeat", "1", "--long-warmup", "1",
                "--dram-gib", "0.25", "--nvme-gib", "0.5", "--root", str(tmp_path / "store"), "--out", str(out),
                "--device", "cpu", "--no-progress"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "ttft.csv")))
    seen = {(r["model"], r["source"], r["method"]) for r in rows}
    for model in ("tiny", "tiny-gqa"):
        assert {(model, "dram", m) for m in ALL_METHODS if m != "hf_offloaded"} <= seen  # offloaded: CUDA only
        assert {(model, "nvme", m) for m in ("recompute", "kv", "hcache", "auto")} <= seen
    for r in rows:
        assert float(r["ttft_ms"]) > 0
        assert int(r["repeats"]) == (2 if r["source"] == "dram" else 1)
        assert int(r["alloc_retries"]) == 0
        if r["method"] in ("kv", "hcache", "hcache-eager-prefill"):
            assert int(r["restored_tokens"]) == 128, r
            assert float(r["max_abs_err"]) <= 1e-5, r
        if r["method"] == "auto" and int(r["restored_tokens"]):
            assert float(r["max_abs_err"]) <= 1e-5, r
    md = (out / "ttft.md").read_text()
    assert "### tiny-gqa, 128 tokens stored, state in nvme" in md and "alloc retries" in md
    assert (out / "ttft.png").stat().st_size > 0
    assert "| hcache |" in capsys.readouterr().out


def test_bench_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli(["bench", "--contexts", "100"])  # not a multiple of the 64-token chunk
    assert "multiples of 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["bench", "--methods", "hcache,teleport"])
    assert "teleport" in capsys.readouterr().err

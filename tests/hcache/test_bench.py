"""`hcache bench` end to end on a CPU: the CI form of the TTFT benchmark (tiny models, few rounds).

Real models, a real store with an NVMe tier, every method's HCache. What must hold whatever the
machine: every method restores the prefix it should, the restored K/V equal the model's own (float32:
exactly), every row has its repetitions, and the CSV, markdown and plot are written.
"""
from __future__ import annotations

import csv

import pytest

from hcache_adapter.bench.report import auto_against_best, paired_ratio
from hcache_adapter.bench.ttft import ALL_METHODS, Row
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
        assert len(r["samples_ms"].split(";")) == int(r["repeats"])  # every round's time, in round order
        assert int(r["alloc_retries"]) == 0
        if r["method"] in ("kv", "hcache", "hcache-eager-prefill"):
            assert int(r["restored_tokens"]) == 128, r
            assert float(r["max_abs_err"]) <= 1e-5, r
        if r["method"] == "auto" and int(r["restored_tokens"]):
            assert float(r["max_abs_err"]) <= 1e-5, r
    md = (out / "ttft.md").read_text()
    assert "### tiny-gqa, 128 tokens stored, state in nvme" in md and "alloc retries" in md
    assert md.count("auto / best other method") == 4  # one per request: 2 models x 2 tiers
    assert (out / "ttft.png").stat().st_size > 0
    assert "| hcache |" in capsys.readouterr().out


def test_bench_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli(["bench", "--contexts", "100"])  # not a multiple of the 64-token chunk
    assert "multiples of 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["bench", "--methods", "hcache,teleport"])
    assert "teleport" in capsys.readouterr().err


def _row(method, samples):
    xs = sorted(samples) or [0.0]
    return Row("m", 1024, "dram", method, xs[len(xs) // 2], 0.0, repeats=len(samples), samples=list(samples))


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    """Round by round: a drift that hits both methods alike cancels (here the host slows down 3x midway)."""
    a = _row("auto", [10.3, 10.1, 30.6, 30.9, 10.2])
    b = _row("hcache", [10.0, 10.0, 30.0, 30.0, 10.0])
    assert paired_ratio(a, b) == pytest.approx(1.02)
    assert paired_ratio(a, _row("kv", [])) != paired_ratio(a, _row("kv", []))  # no common rounds: nan


def test_auto_is_held_against_the_best_other_method_by_median():
    group = {m: _row(m, xs) for m, xs in {"recompute": [40.0, 41.0, 39.0], "kv": [22.0, 23.0, 21.0],
                                          "hcache": [20.0, 21.0, 25.0], "ideal": [5.0, 5.0, 5.0],
                                          "auto": [20.5, 21.0, 24.0]}.items()}
    line = auto_against_best(group)
    assert "(hcache)" in line and "1.000x" in line and "3 paired rounds" in line  # ideal is a reference, not a method
    del group["auto"]
    assert auto_against_best(group) is None

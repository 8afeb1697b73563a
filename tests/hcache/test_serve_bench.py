"""serve-bench: the traces follow their published statistics, the replay serves every request once in
a valid order, the thresholds are read off correctly, and the whole command runs on a CPU.

The end-to-end run is the CI form of `hcache serve-bench` (tiny model, short traces): real model,
real store, real HCache per method.
"""
from __future__ import annotations

import csv
import math
import statistics
from collections import Counter

import pytest
import torch
from tests.helpers.models import build as build_model

from hcache_adapter.cli import main as cli
from hcache_adapter.serving.report import crossing, linear_crossing
from hcache_adapter.serving.simulate import ServerConfig, replay
from hcache_adapter.serving.trace import ChatStats, chat_trace, doc_trace


def test_chat_trace_follows_sharegpt_statistics():
    trace = chat_trace(4000, seed=1, vocab=1000, active=4)
    turns = Counter(r.session for r in trace.requests)
    complete = [sid for sid in turns if sid < max(turns) - 10]  # sessions the cut did not truncate
    counts = [turns[s] for s in complete]
    s = ChatStats()
    assert abs(statistics.mean(counts) - s.mean_turns) < 0.25
    assert abs(sum(c > 1 for c in counts) / len(counts) - s.multi_turn_share) < 0.05
    assert abs(statistics.mean(len(r.new_tokens) for r in trace.requests) / s.mean_input - 1) < 0.15
    assert abs(statistics.mean(r.output_tokens for r in trace.requests) / s.mean_output - 1) < 0.15
    for sid in complete[:50]:
        assert [r.turn for r in trace.requests if r.session == sid] == list(range(turns[sid]))


def test_doc_trace_and_arrivals():
    trace = doc_trace(200, seed=2, vocab=1000, active=2)
    lengths = [len(s.context) for s in trace.sessions.values()]
    assert min(lengths) >= 4096 and max(lengths) <= 16384
    assert 3.0 < len(trace.requests) / len(trace.sessions) < 5.0
    timed = trace.at_rate(4.0, seed=0)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(timed.requests, timed.requests[1:])]
    assert all(g > 0 for g in gaps) and abs(statistics.mean(gaps) - 0.25) < 0.05
    assert [r.new_tokens for r in timed.requests] == [r.new_tokens for r in trace.at_rate(1.0, 0).requests]
    with pytest.raises(ValueError):
        trace.at_rate(0, 0)


def test_replay_serves_every_request_once_in_conversation_order():
    model = build_model("llama_gqa")
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    trace = chat_trace(14, seed=3, vocab=model.config.vocab_size, active=3, scale=0.05).at_rate(1000.0, seed=1)
    cfg = ServerConfig(max_batch=3, max_batch_tokens=4096, max_new_tokens=3, pad_token_id=2,
                       vocab=model.config.vocab_size)
    with torch.no_grad():
        records = replay(trace, model.generate, cfg, torch.device("cpu"))
    assert sorted(r.rid for r in records) == [r.rid for r in trace.requests]
    assert all(r.batch_size <= 3 and r.ttft_s >= 0 and r.first_token_s <= r.finish_s for r in records)
    by_session = {}
    for r in sorted(records, key=lambda r: r.turn):
        prev = by_session.get(r.session)
        if prev is not None:  # a turn arrives after the previous answer, and its prompt holds that answer
            assert r.turn == prev.turn + 1 and r.arrival_s >= prev.finish_s and r.start_s >= prev.finish_s
            assert r.prompt_tokens >= prev.prompt_tokens + prev.generated
        by_session[r.session] = r
    assert max(r.batch_size for r in records) > 1  # a burst of arrivals is batched


def test_crossing_points():
    assert crossing([(0.0, 2.0), (0.5, 1.5), (1.0, 1.0)], 1.25) == pytest.approx(0.75)
    assert crossing([(0.5, 1.5), (0.0, 2.0)], 1.05) is None
    assert crossing([(0.2, 1.0), (0.6, 1.2)], 1.05) == 0.2
    # TTFT_base = 100 - 90 h, TTFT_ours = 40 - 30 h: base / ours = 1.5 at h = 0.5 / (0.9 - 0.45) ...
    h = linear_crossing([(0, 100), (1, 10)], [(0, 40), (1, 10)], 1.5)
    assert math.isclose((100 - 90 * h) / (40 - 30 * h), 1.5)


def test_serve_bench_runs_on_a_cpu(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli(["serve-bench", "--preset", "ci", "--out", str(out), "--root", str(tmp_path / "store"),
              "--chat-requests", "8", "--doc-requests", "4", "--chat-rates", "16", "--doc-rates", "8",
              "--sensitivity-fractions", "0,1",
              "--sensitivity-methods", "recompute,hcache", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "hit" in printed and f"results under {out}" in printed
    rows = list(csv.DictReader(open(out / "summaries.csv")))
    rate_runs = {(r["trace"], r["method"]) for r in rows if r["section"] == "rate"}
    assert rate_runs == {(t, m) for t in ("chat", "doc") for m in ("recompute", "kv", "hcache", "auto")}
    for r in rows:
        assert float(r["ttft_p50_ms"]) > 0 and 0 <= float(r["gpu_hit_ratio"]) <= 1
        assert int(r["requests"]) > 0
    sens = {r["gpu_budget_tokens"]: r for r in rows if r["section"] == "sensitivity" and r["method"] == "hcache"}
    assert float(sens["0"]["gpu_hit_ratio"]) == 0 and int(sens["0"]["restored_tokens"]) > 0
    assert max(float(r["gpu_hit_ratio"]) for r in sens.values()) > 0
    md = (out / "serve_bench.md").read_text()
    assert "When not to use it" in md and "Beside the paper" in md and "ShareGPT" in md
    assert (out / "ttft_vs_rate.png").stat().st_size > 0 and (out / "gain_vs_hit_ratio.png").stat().st_size > 0
    assert sum(1 for _ in open(out / "requests.csv")) > len(rows)


def test_serve_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["serve-bench", "--help"])
    assert e.value.code == 0 and "--time-limit-s" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_serve_bench_ci_preset_on_the_gpu(tmp_path):
    out = tmp_path / "out"
    assert cli(["serve-bench", "--preset", "ci", "--device", "cuda", "--out", str(out), "--root",
                str(tmp_path / "store"), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "summaries.csv")))
    assert {r["method"] for r in rows} == {"recompute", "kv", "hcache", "auto"}

"""The tensor-parallel profile: how the ranks' figures combine, and what the all-gather costs the planner."""
from __future__ import annotations

from hcache_adapter.parallel.profile import combine
from hcache_adapter.scheduler.planner import choose_save_plan
from hcache_adapter.scheduler.profile import Profile


def rank_profile(dram_bw: float, project_b: float, host_layer_s: float = 0.0) -> Profile:
    return Profile(n_layers=4, hidden_bytes_per_token=8192, kv_bytes_per_token=8192, read_bytes_per_s={"dram": dram_bw},
                   project_coef=(0.0, project_b), recompute_coef=(0.0, 1e-6, 0.0), host_layer_s=host_layer_s)


def test_combine_adds_bandwidth_and_kv_shards_and_keeps_the_slowest_rank():
    p = combine([rank_profile(10e9, 1e-8, 1e-5), rank_profile(20e9, 3e-8, 2e-5)], gather_coef=(1e-5, 1e-9))
    assert p.read_bytes_per_s == {"dram": 30e9}  # the aggregate of the ranks' links
    assert p.kv_bytes_per_token == 2 * 8192 and p.hidden_bytes_per_token == 8192  # every shard; one hidden state
    assert p.project_coef == (0.0, 3e-8) and p.host_layer_s == 2e-5
    assert p.tp_world == 2 and p.gather_seconds(1000) == 1e-5 + 1e-6
    assert p.project_seconds(1000) == 3e-5 + p.gather_seconds(1000)
    assert Profile.from_json(p.to_json()) == p


def test_an_expensive_gather_makes_auto_save_kv():
    cheap = combine([rank_profile(10e9, 1e-9)] * 2, gather_coef=(0.0, 0.0))
    costly = combine([rank_profile(10e9, 1e-9)] * 2, gather_coef=(0.0, 1e-6))
    assert "H" in choose_save_plan(cheap, sources=("dram",))  # MHA: half the bytes of K+V, gathered for free
    assert choose_save_plan(costly, sources=("dram",)) == "KKKK"


def test_profiles_without_tensor_parallel_fields_load_as_one_process():
    old = rank_profile(1e9, 1e-8)
    text = old.to_json().replace('"gather_coef"', '"unused"').replace('"tp_world": 1,', "")
    import json

    d = json.loads(text)
    d.pop("unused")
    back = Profile.from_json(json.dumps(d))
    assert back.tp_world == 1 and back.gather_seconds(10_000) == 0.0

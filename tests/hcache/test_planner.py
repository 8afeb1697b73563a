"""The bubble-free scheduler's logic: plans for given profiles (no hardware involved)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcache_adapter.scheduler.planner import (
    choose_recompute_layers,
    choose_save_plan,
    effective_bandwidth,
    estimate,
    min_recompute,
    ttft_estimates,
)
from hcache_adapter.scheduler.profile import Profile, fit_linear, fit_quadratic

GB = 1e9


def h100_llama7b(nvme_gbps: float = 2.0) -> Profile:
    """Figures measured on the lent H100 for a Llama-2-7B shape (issue #4): 4096 tokens,
    hidden copy 19.5 ms, projection 19.0 ms, prefill 131 ms (32 layers)."""
    n = 4096
    return Profile(
        n_layers=32,
        hidden_bytes_per_token=4096 * 2,
        kv_bytes_per_token=2 * 4096 * 2,
        read_bytes_per_s={"dram": 54.7 * GB, "nvme": nvme_gbps * GB},
        project_coef=(0.0, 19.0e-3 / 32 / n),
        recompute_coef=(0.0, 131e-3 / 32 / n, 0.0),
        device="cuda",
        dtype="float16",
    )


def gqa_llama3_8b() -> Profile:
    p = h100_llama7b()
    p.kv_bytes_per_token = 2 * 1024 * 2  # 8 KV heads x 128
    return p


def test_mha_saves_hidden_states_everywhere():
    assert choose_save_plan(h100_llama7b()) == "H" * 32


def test_gqa_saves_kv_because_it_is_smaller_and_needs_no_compute():
    assert choose_save_plan(gqa_llama3_8b()) == "K" * 32


def test_fast_dram_needs_no_recomputation():
    p = h100_llama7b()
    est = choose_recompute_layers(p, "H" * 32, 4096, p.read_bytes_per_s["dram"])
    assert est.recompute_layers == 0
    # Balanced: copy and projection both ~19 ms; the pipeline finishes within about a layer of either.
    assert est.total_s == pytest.approx(max(est.io_s, est.compute_s), rel=0.1)


def test_slow_disk_recomputes_the_leading_layers_to_balance_io_and_compute():
    p = h100_llama7b(nvme_gbps=2.0)
    plan = "H" * 32
    best = choose_recompute_layers(p, plan, 4096, p.read_bytes_per_s["nvme"])
    assert 0 < best.recompute_layers < 32
    only_io = estimate(p, plan, 0, 4096, p.read_bytes_per_s["nvme"]).total_s
    only_compute = estimate(p, plan, 32, 4096, p.read_bytes_per_s["nvme"]).total_s
    assert best.total_s < min(only_io, only_compute)
    # The chosen split leaves I/O and compute within one layer's worth of each other.
    layer_io = p.hidden_bytes_per_token * 4096 / p.read_bytes_per_s["nvme"]
    assert abs(best.io_s - best.compute_s) <= layer_io + p.recompute_seconds(4096)


def test_a_shallow_prefetch_ring_limits_what_recomputation_can_hide():
    p = h100_llama7b(nvme_gbps=2.0)
    bw = p.read_bytes_per_s["nvme"]
    deep = choose_recompute_layers(p, "H" * 32, 4096, bw)
    shallow = choose_recompute_layers(p, "H" * 32, 4096, bw, depth=2)
    assert shallow.total_s >= deep.total_s
    assert shallow.recompute_layers >= deep.recompute_layers


def test_plan_with_recompute_layers_forces_at_least_those():
    p = h100_llama7b()
    plan = "RRR" + "H" * 29
    assert min_recompute(plan) == 3
    assert choose_recompute_layers(p, plan, 4096, p.read_bytes_per_s["dram"]).recompute_layers >= 3
    with pytest.raises(ValueError):
        estimate(p, plan, 2, 4096, p.read_bytes_per_s["dram"])


def test_all_recompute_costs_the_prefill():
    p = h100_llama7b()
    est = estimate(p, "H" * 32, 32, 4096, p.read_bytes_per_s["dram"])
    assert est.io_s == 0 and est.total_s == pytest.approx(131e-3)


@settings(max_examples=200, deadline=None)
@given(
    layers=st.integers(1, 48),
    n=st.integers(1, 16384),
    bw=st.floats(1e8, 1e11),
    proj=st.floats(0, 1e-7),
    rec=st.floats(1e-9, 1e-6),
    hidden=st.integers(64, 16384),
    kv=st.integers(64, 32768),
)
def test_chosen_split_is_never_worse_than_any_pure_method(layers, n, bw, proj, rec, hidden, kv):
    p = Profile(layers, hidden, kv, {"x": bw}, (0.0, proj), (0.0, rec, 0.0))
    for plan in ("H" * layers, "K" * layers):
        best = choose_recompute_layers(p, plan, n, bw, margin=0.0)
        for r in range(layers + 1):
            assert best.total_s <= estimate(p, plan, r, n, bw).total_s + 1e-12
        assert best.total_s >= max(best.io_s, best.compute_s) - 1e-12
        # With the default margin: recompute everything, or a split estimated clearly faster than that.
        everything = estimate(p, plan, layers, n, bw)
        chosen = choose_recompute_layers(p, plan, n, bw)
        assert chosen.recompute_layers == layers or chosen.total_s <= 0.9 * everything.total_s + 1e-12


def test_a_split_that_barely_beats_recomputation_is_not_taken():
    """Loading wins by 5% on paper: within the error of a measured profile, so recompute everything."""
    p = h100_llama7b(nvme_gbps=2.0)
    plan = "H" * 32
    everything = estimate(p, plan, 32, 4096, 1.0).total_s
    # a bandwidth at which the best split is ~5% faster than recomputing everything
    lo, hi = 1e6, 1e12
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        if choose_recompute_layers(p, plan, 4096, mid, margin=0.0).total_s < 0.95 * everything:
            hi = mid
        else:
            lo = mid
    assert choose_recompute_layers(p, plan, 4096, hi, margin=0.0).recompute_layers < 32
    assert choose_recompute_layers(p, plan, 4096, hi).recompute_layers == 32


def test_equal_restore_times_choose_the_plan_that_stores_less():
    """From a disk so slow that every plan recomputes everything, the smaller state wins the tie."""
    mha = h100_llama7b(nvme_gbps=0.001)
    assert choose_save_plan(mha, sources=("nvme",)) == "H" * 32  # hidden: half of K+V
    gqa = gqa_llama3_8b()
    gqa.read_bytes_per_s["nvme"] = 0.001 * GB
    assert choose_save_plan(gqa, sources=("nvme",)) == "K" * 32  # K+V: half of the hidden state


def test_memory_tiers_never_split_but_a_slow_disk_does():
    from hcache_adapter.scheduler.planner import restore_estimate

    p = h100_llama7b(nvme_gbps=2.0)
    p.read_bytes_per_s["dram"] = 2.0 * GB  # even a DRAM tier as slow as the disk
    assert restore_estimate(p, "H" * 32, 4096, "dram").recompute_layers == 0
    assert 0 < restore_estimate(p, "H" * 32, 4096, "nvme").recompute_layers < 32


def test_effective_bandwidth_of_a_mixed_read():
    p = h100_llama7b(nvme_gbps=2.0)
    assert effective_bandwidth(p, {"dram": 100}) == pytest.approx(54.7 * GB)
    mixed = effective_bandwidth(p, {"dram": 100, "nvme": 100})
    assert 2.0 * GB < mixed < 4.0 * GB  # dominated by the slow half


def test_profile_json_round_trip(tmp_path):
    p = h100_llama7b()
    p.save(tmp_path / "p.json")
    q = Profile.load(tmp_path / "p.json")
    assert q == p
    assert Profile.load(tmp_path / "missing.json") is None


def test_fits():
    a, b = fit_linear([(100, 1.0 + 0.01 * 100), (200, 1.0 + 0.01 * 200), (400, 1.0 + 0.01 * 400)])
    assert a == pytest.approx(1.0) and b == pytest.approx(0.01)
    a, b, c = fit_quadratic([(n, 0.5 + 0.001 * n + 1e-6 * n * n) for n in (64, 256, 1024, 4096)])
    assert (a, b, c) == pytest.approx((0.5, 0.001, 1e-6), rel=1e-6, abs=1e-9)


def h200_host_costs(p: Profile, *, captured: bool) -> Profile:
    """A launch-bound host (the lent H200's VM): 20 us per chunk key, 0.3 ms a layer, 50 ms an eager forward."""
    p.host_key_s, p.host_layer_s, p.forward_host_s = 20e-6, 0.3e-3, 50e-3
    p.captured_forward_s = 3.4e-3 if captured else 0.0
    return p


def test_ttft_of_loading_counts_the_hosts_work_and_the_captured_forward():
    p = h200_host_costs(h100_llama7b(), captured=True)
    eager = ttft_estimates(p, "H" * 32, 4096, 32, p.read_bytes_per_s["dram"], captured=False)
    graphed = ttft_estimates(p, "H" * 32, 4096, 32, p.read_bytes_per_s["dram"], captured=True)
    host = 32 * 64 * 20e-6 + 32 * 0.3e-3
    assert eager["load"] == pytest.approx(host + 50e-3)  # the GPU's ~20 ms of restore hide under the host's work
    assert graphed["load"] == pytest.approx(max(host, 0.0195) + 3.4e-3, rel=0.2)
    assert graphed["load"] < eager["load"] < eager["recompute"]


@pytest.mark.parametrize("captured", [False, True])
def test_auto_recomputes_a_short_prefix_from_dram_only_when_that_is_faster_end_to_end(captured, tmp_path):
    """At 256 tokens loading 32 layers costs the host 4 chunks x 32 reads plus an eager forward, while one
    prefill of 288 tokens is bound by the same forward: without a captured forward, recompute wins."""
    from hcache_adapter.layout import StateLayout
    from hcache_adapter.scheduler.auto import AutoScheduler

    p = h200_host_costs(h100_llama7b(), captured=captured)
    p.recompute_coef = (0.0, 1e-9, 0.0)  # a short prefill costs the GPU next to nothing
    layout = StateLayout("f", "hc", 64, torch.float16, 4096, (32,) * 32, (128,) * 32)
    auto = AutoScheduler(layout, lambda: p)
    decision = auto.split("H" * 32, 256, {"dram": 256 * 8192 * 32}, depth=32, suffix_tokens=32, captured=captured)
    assert decision.recompute_layers == (0 if captured else 32)


def _nvme_auto(nvme_gbps: float = 1.4):
    """auto for the 7B shape with its state on NVMe at 16K tokens, where the profile says: split."""
    from hcache_adapter.layout import StateLayout
    from hcache_adapter.scheduler.auto import AutoScheduler

    p = h100_llama7b(nvme_gbps)
    layout = StateLayout("f", "hc", 64, torch.float16, 4096, (32,) * 32, (128,) * 32)
    auto = AutoScheduler(layout, lambda: p)
    n = 16384

    def decide():
        return auto.split("H" * 32, n, {"nvme": n * 8192 * 32}, depth=4, suffix_tokens=32)

    return auto, decide


def test_auto_is_not_locked_out_of_nvme_by_one_slow_restore():
    """One split restore far slower than recomputing everything (a disk hiccup) among restores that ran at
    their estimate: the median of the last few keeps auto splitting."""
    auto, decide = _nvme_auto()
    first = decide()
    assert 0 < first.recompute_layers < 32 and first.estimate is not None
    for seconds in (first.estimate.total_s, first.estimate.total_s * 1.02, 10 * first.everything_s):
        auto.observe(first, seconds)
        d = decide()
        assert 0 < d.recompute_layers < 32, seconds
    assert auto.nvme_efficiency > 0.95


def test_auto_stops_loading_from_nvme_when_splits_lose_and_tries_again_now_and_then():
    """Split restores slower than recomputing everything: auto recomputes, and every REPROBE_EVERY-th restore
    tries the profile's split once more; when the disk then delivers what the profile says, splits come back."""
    from hcache_adapter.scheduler.auto import REPROBE_EVERY

    auto, decide = _nvme_auto()
    d = decide()
    auto.observe(d, 2 * d.everything_s)  # a loss
    auto.observe(d, 2 * d.everything_s)
    kinds = [decide().recompute_layers for _ in range(REPROBE_EVERY - 1)]
    assert kinds == [32] * (REPROBE_EVERY - 1)  # recompute everything, as learned
    probe = decide()
    assert 0 < probe.recompute_layers < 32 and probe.estimate is not None  # the profile's split, tried again
    assert decide().recompute_layers == 32  # one try, then back to what was learned
    splits = 0
    for _ in range(6 * REPROBE_EVERY):  # the disk is as fast as profiled again: every split meets its estimate
        d = decide()
        if d.estimate is not None:
            auto.observe(d, d.estimate.total_s)
            splits += 1
    assert splits >= 3
    assert all(0 < decide().recompute_layers < 32 for _ in range(5))  # splitting again, every time


def test_auto_learns_a_slower_disk_and_moves_the_split():
    """Split restores that take 1.5x their estimate: the learned scale lowers NVMe's bandwidth, and the split
    recomputes more layers (or everything), never fewer."""
    auto, decide = _nvme_auto(nvme_gbps=2.0)
    first = decide()
    r0 = first.recompute_layers
    for _ in range(5):
        d = decide()
        if d.estimate is None:
            break
        auto.observe(d, 1.5 * d.estimate.total_s)
    assert auto.nvme_efficiency < 0.8
    assert decide().recompute_layers >= r0


def test_auto_judges_split_restores_against_measured_prefills_when_it_has_them():
    """A split whose first token came later than the estimate of recomputing everything (a profile fitted on
    short prompts underestimates a 16K prefill) counts as a loss until a measured prefill of that length says
    it won; and one slower than the measured prefill is a loss although the estimate said otherwise."""
    auto, decide = _nvme_auto()
    d = decide()
    assert d.estimate is not None and d.n_tokens == 16384
    slow_but_better = 1.05 * d.everything_s
    for _ in range(3):
        auto.observe(d, d.estimate.total_s, slow_but_better)
    assert auto.nvme_efficiency == 0.0  # judged against the estimate: losses
    auto.observe_everything(16384, 1.15 * d.everything_s)  # what recomputing everything really took
    assert auto.nvme_efficiency == 1.0  # re-judged: wins, at their estimate
    assert 0 < decide().recompute_layers < 32
    auto.observe_everything(4096, 0.1)  # another length says nothing about this one
    assert auto.nvme_efficiency == 1.0
    auto2, decide2 = _nvme_auto()
    d2 = decide2()
    auto2.observe_everything(16384, 0.9 * d2.everything_s)
    for _ in range(3):
        auto2.observe(d2, d2.estimate.total_s, 0.95 * d2.everything_s)  # under the estimate, over the measurement
    assert auto2.nvme_efficiency == 0.0
    assert decide2().recompute_layers == 32

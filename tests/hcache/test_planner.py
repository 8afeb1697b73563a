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


def _nvme_auto(nvme_gbps: float = 1.4, depth: int = 4, recompute: float = 1.0):
    """auto for the 7B shape with its state on NVMe at 16K tokens, where the profile says: split (`recompute`
    scales the profile's recomputation cost, `depth` is the ring's)."""
    from hcache_adapter.layout import StateLayout
    from hcache_adapter.scheduler.auto import AutoScheduler

    p = h100_llama7b(nvme_gbps)
    p.recompute_coef = tuple(recompute * c for c in p.recompute_coef)
    layout = StateLayout("f", "hc", 64, torch.float16, 4096, (32,) * 32, (128,) * 32)
    auto = AutoScheduler(layout, lambda: p)
    n = 16384

    def decide():
        return auto.split("H" * 32, n, {"nvme": n * 8192 * 32}, depth=depth, suffix_tokens=32)

    return auto, decide


def _outcome(d, *, ttft: float, per_layer: float | None = None, read_gbps: float | None = None):
    """What a split restore of `d` measured: its time to first token, one recomputed layer's time, the disk's
    bandwidth as its reads saw it (each None: not measured)."""
    from hcache_adapter.scheduler.timing import Outcome

    r, n = d.recompute_layers, d.n_tokens
    nbytes = (32 - r) * n * 8192
    return Outcome(n, r, ttft, ttft, True, None if per_layer is None else r * per_layer,
                   nbytes if read_gbps else 0, nbytes / (read_gbps * GB) if read_gbps else 0.0)


def _learn_prefill(auto, n: int, ttft: float) -> None:
    """auto learns that a request of `n` stored tokens it left to the model's prefill took `ttft`."""
    from hcache_adapter.scheduler.auto import SplitDecision
    from hcache_adapter.scheduler.timing import Outcome

    auto.learn(SplitDecision(32), Outcome(n, 32, None, ttft, True))


def test_auto_is_not_locked_out_of_nvme_by_one_slow_read():
    """One split restore whose reads crawled (a disk hiccup) among restores that read at the profile's speed:
    the median of the last few keeps auto splitting, and its bandwidth near the profile's."""
    auto, decide = _nvme_auto()
    first = decide()
    assert 0 < first.recompute_layers < 32 and first.estimate is not None
    _learn_prefill(auto, 16384, first.everything_s)  # what the splits are judged against
    for gbps in (1.4, 1.38, 0.1):
        auto.learn(first, _outcome(first, ttft=first.estimate.total_s, read_gbps=gbps))
        d = decide()
        assert 0 < d.recompute_layers < 32, gbps
    assert auto.nvme_efficiency > 0.95


def test_auto_learns_a_slower_disk_from_its_reads_and_recomputes_more():
    """Reads at 40% of the profiled bandwidth: the split recomputes more layers (or everything), never fewer."""
    auto, decide = _nvme_auto(nvme_gbps=3.0, depth=8)
    first = decide()
    for _ in range(3):
        auto.learn(first, _outcome(first, ttft=0.1, read_gbps=1.2))
    assert auto.nvme_efficiency == pytest.approx(0.4)
    assert decide().recompute_layers > first.recompute_layers


def test_a_split_that_lost_to_the_measured_prefill_is_held_back_at_that_length_and_tried_again_now_and_then():
    """A split whose first token came after the measured prefill's: auto recomputes everything at that length,
    and every REPROBE_EVERY-th request there tries a split once more; when it then wins, splits come back.
    Another length is not held back."""
    from hcache_adapter.scheduler.auto import REPROBE_EVERY

    auto, decide = _nvme_auto()
    d = decide()
    _learn_prefill(auto, 16384, d.everything_s)
    auto.learn(d, _outcome(d, ttft=1.05 * d.everything_s))  # a loss
    assert auto.learned_nvme and auto.nvme_efficiency == 1.0  # the disk is not to blame: it was not measured
    kinds = [decide().recompute_layers for _ in range(REPROBE_EVERY - 1)]
    assert kinds == [32] * (REPROBE_EVERY - 1)
    other = auto.split("H" * 32, 8192, {"nvme": 8192 * 8192 * 32}, depth=4, suffix_tokens=32)
    assert 0 < other.recompute_layers < 32  # 8K was never judged
    probe = decide()
    assert 0 < probe.recompute_layers < 32 and probe.estimate is not None
    auto.learn(probe, _outcome(probe, ttft=0.9 * d.everything_s))  # it wins now
    assert all(0 < decide().recompute_layers < 32 for _ in range(5))


def test_a_split_planned_on_a_wrong_recomputation_cost_is_replanned_with_the_measured_one():
    """The lent H200's profile once put a 16K layer's recomputation at 1.6x what it took: auto loaded too many
    layers. Its own recomputed layers measured the real cost; with no prefill of that length measured, the
    next request is left to the model's prefill to measure one (never more than EXPLORE_MAX times), which
    judges the first split a loss; the next split recomputes more layers."""
    from hcache_adapter.scheduler.auto import EXPLORE_MAX

    auto, decide = _nvme_auto(depth=16, recompute=1.6)
    p = auto.profile
    first = decide()
    real = p.recompute_seconds(16384) / 1.6
    slow = (32 - first.recompute_layers) * 16384 * 8192 / (1.4 * GB)  # bound by its reads
    assert slow > 32 * real  # so it lost to recomputing everything
    auto.learn(first, _outcome(first, ttft=slow, per_layer=real, read_gbps=1.4))
    assert auto.baseline(16384) is None
    assert [decide().recompute_layers for _ in range(EXPLORE_MAX)] == [32] * EXPLORE_MAX  # measuring the prefill
    second = decide()  # nothing measured came back: it gives up exploring
    assert first.recompute_layers < second.recompute_layers < 32
    _learn_prefill(auto, 16384, 32 * real)
    assert auto.baseline(16384) == pytest.approx(32 * real)
    auto.learn(first, _outcome(first, ttft=slow, per_layer=real, read_gbps=1.4))  # judged now: a loss
    third = decide()
    assert third.recompute_layers == second.recompute_layers and third.everything_s == pytest.approx(32 * real, rel=0.02)


def test_a_length_with_splits_but_no_measured_prefill_leaves_one_request_to_the_prefill():
    """A split restore at 4K ran 15% slower per recomputed layer than the model's prefill (beside its readers):
    auto cannot tell from it whether recomputing everything is faster, so it measures one prefill, then judges
    the split by it and stops splitting where it lost."""
    auto, decide = _nvme_auto()
    d = decide()
    assert 0 < d.recompute_layers < 32
    auto.learn(d, _outcome(d, ttft=1.05 * d.everything_s, per_layer=1.15 * d.everything_s / 32))
    probe = decide()
    assert probe.recompute_layers == 32 and probe.estimate is None  # left to the prefill, to measure it
    _learn_prefill(auto, 16384, d.everything_s)
    d2 = decide()
    assert 0 < d2.recompute_layers < 32  # what was measured since; this split was not judged yet
    auto.learn(d2, _outcome(d2, ttft=1.05 * d.everything_s, per_layer=1.15 * d.everything_s / 32))
    assert decide().recompute_layers == 32  # it lost to the measured prefill: held back


def test_auto_plans_nvme_splits_with_recomputation_scaled_to_measured_prefills():
    """At 1.0 GB/s the profile's estimates make a split win by less than the margin, so auto recomputes
    everything; once prefills of that length measured 1.2x the profile's recomputation, a split pays, planned
    with the measured cost. Another length keeps the profile's."""
    auto, decide = _nvme_auto(nvme_gbps=1.0)
    d = decide()
    assert d.recompute_layers == 32
    p = auto.profile
    est = 32 * p.recompute_seconds(16384)
    assert auto.fitted(p, 16384, 32) is p  # nothing measured yet
    _learn_prefill(auto, 16384, 1.2 * est)
    d = decide()
    assert 0 < d.recompute_layers < 32 and d.everything_s == pytest.approx(1.2 * est)
    assert auto.fitted(p, 8192, 32) is p
    assert auto.fitted(p, 16384, 32).recompute_seconds(16384) == pytest.approx(1.2 * p.recompute_seconds(16384))
    for _ in range(4):
        _learn_prefill(auto, 16384, 50 * est)  # an outlier-ridden median is held to 5x
    assert auto.fitted(p, 16384, 32).recompute_seconds(16384) == pytest.approx(5 * p.recompute_seconds(16384))

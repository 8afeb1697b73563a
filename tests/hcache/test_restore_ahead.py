"""How much of a memory-tier restore is queued before generate()'s first forward (`layers_ahead`)."""
from __future__ import annotations

import pytest

from hcache_adapter.loader import LayerRead
from hcache_adapter.prefix_source import layers_ahead
from hcache_adapter.issue_ahead import IssueAhead
from hcache_adapter.restore import Restorer


def _reads(layers: int, chunks: int, chunk_shape=(64, 4096)) -> list[LayerRead]:
    return [LayerRead(l, "H", [f"l{l}/c{c}" for c in range(chunks)], chunk_shape) for l in range(layers)]


def test_whole_layers_fit_the_budget_and_at_least_one_is_queued():
    reads = _reads(32, 64)  # the 7B shape at 4K: 32 MiB of float16 hidden states per layer
    layer = 64 * 64 * 4096 * 2
    assert layers_ahead(reads, 10 * layer, 2) == 10
    assert layers_ahead(reads, 10 * layer + 1, 2) == 10
    assert layers_ahead(reads, 10 * layer - 1, 2) == 9
    assert layers_ahead(reads, 1, 2) == 1
    assert layers_ahead(reads, 1 << 50, 2) == 32
    assert layers_ahead([], 1 << 30, 2) == 1


def test_the_budget_lasts_through_the_measured_set_up_with_a_margin():
    """Before any measurement: 5 ms of copies x 1.5 (412 MB: 12 of the 7B shape's 4K layers, 3 of its 16K
    ones, every layer of a 1K restore); then the weighted mean of what restores measured."""
    ahead = IssueAhead()
    assert ahead.budget() == int(55e9 * 0.005 * 1.5)
    assert layers_ahead(_reads(32, 64), ahead.budget(), 2) == 12
    assert layers_ahead(_reads(32, 256), ahead.budget(), 2) == 3
    assert layers_ahead(_reads(32, 16), ahead.budget(), 2) == 32
    ahead.observe(0.008)  # a slow host's set-up
    assert ahead.budget() == int(55e9 * 0.008 * 1.5)
    ahead.observe(0.004)
    assert ahead.setup_s == pytest.approx(0.7 * 0.008 + 0.3 * 0.004)
    for _ in range(40):
        ahead.observe(0.0)  # a set-up too short to matter: the floor
    assert ahead.budget() == ahead.floor


def test_a_set_up_that_says_nothing_about_generate_is_ignored():
    """A caller that restored and did something else for seconds before generating, or a clock that went
    backwards: the measurement is dropped."""
    ahead = IssueAhead()
    ahead.observe(3.0)
    ahead.observe(-0.001)
    assert ahead.setup_s is None


def test_a_fixed_budget_is_kept():
    ahead = IssueAhead(fixed=1 << 20)
    ahead.observe(0.008)
    assert ahead.budget() == 1 << 20


def test_a_non_positive_budget_is_refused():
    with pytest.raises(ValueError, match="issue_ahead_bytes"):
        Restorer(None, None, None, None, "cpu", issue_ahead_bytes=0)
    with pytest.raises(ValueError, match="weight"):
        IssueAhead(weight=0)
    with pytest.raises(ValueError, match="issue_window"):
        IssueAhead(issue_window=0)


def test_when_the_host_queues_a_layer_slower_than_its_copies_one_layer_is_queued_ahead():
    """A 1K layer of the 7B shape (8 MiB: 0.15 ms of copies) queued in 0.3 ms of host time: the GPU keeps up
    with the host, so one layer goes ahead; a 4K layer (32 MiB, 0.61 ms) keeps the set-up's budget."""
    ahead = IssueAhead()
    one_k, four_k = 16 * 64 * 4096 * 2, 64 * 64 * 4096 * 2
    assert ahead.budget(one_k) == ahead.budget(four_k) == int(55e9 * 0.005 * 1.5)  # nothing measured yet
    ahead.observe_issue(0.0096, 32)
    assert ahead.issue_s == pytest.approx(0.0003)
    assert ahead.host_bound(one_k) and not ahead.host_bound(four_k)
    assert ahead.budget(one_k) == 1
    assert layers_ahead(_reads(32, 16), ahead.budget(one_k), 2) == 1
    assert ahead.budget(four_k) == int(55e9 * 0.005 * 1.5)
    assert ahead.budget() == int(55e9 * 0.005 * 1.5)  # layer size unknown: the set-up's budget


def test_the_host_time_per_layer_is_a_median_that_drops_the_restores_capturing_graphs():
    """A restore that captures its projection graphs queues a layer in tens of ms; the median of the last
    nine restores is not moved by the odd one, and old measurements leave the window."""
    ahead = IssueAhead()
    one_k = 16 * 64 * 4096 * 2
    for seconds in (0.0001, 0.0001, 0.05, 0.0001):
        ahead.observe_issue(seconds, 1)
    assert ahead.issue_s == pytest.approx(0.0001)
    assert not ahead.host_bound(one_k)
    for _ in range(ahead.issue_window):
        ahead.observe_issue(0.0004, 1)
    assert ahead.issue_s == pytest.approx(0.0004)
    assert ahead.host_bound(one_k)
    ahead.observe_issue(0.01, 0)  # nothing queued: no measurement
    ahead.observe_issue(-1.0, 3)
    assert ahead.issue_s == pytest.approx(0.0004)


def test_a_fixed_budget_is_kept_however_slow_the_host():
    ahead = IssueAhead(fixed=1 << 20)
    ahead.observe_issue(0.01, 1)
    assert ahead.budget(1 << 20) == 1 << 20

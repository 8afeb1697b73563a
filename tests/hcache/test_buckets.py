"""Bucket logic of the captured prefill and the projection graphs: the static shapes a request maps to.

Properties: a bucket always holds the request, wastes at most a bounded share,
and equal requests map to equal buckets (so a length seen twice replays a graph).
"""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hcache_adapter.prefill_graph import MIN_SUFFIX, segments, suffix_bucket
from hcache_adapter.projection.graphs import MIN_STEP, bucket_rows


@given(st.integers(min_value=1, max_value=1 << 20))
def test_projection_bucket_holds_the_rows_with_at_most_a_quarter_of_padding(n):
    b = bucket_rows(n)
    assert b >= n
    if n > MIN_STEP:
        assert b - n <= max(MIN_STEP, n // 4)
    else:
        assert b == MIN_STEP


@given(st.integers(min_value=1, max_value=1 << 20), st.integers(min_value=1, max_value=1 << 20))
def test_projection_buckets_are_monotonic(a, b):
    if a <= b:
        assert bucket_rows(a) <= bucket_rows(b)


@given(st.integers(min_value=1, max_value=1 << 16))
def test_suffix_bucket_is_the_next_power_of_two_of_at_least_the_minimum(s):
    b = suffix_bucket(s)
    assert b >= s and b >= MIN_SUFFIX
    assert b & (b - 1) == 0
    assert b == MIN_SUFFIX or b < 2 * s


@given(st.integers(min_value=1, max_value=1 << 16), st.integers(min_value=0, max_value=1 << 18))
def test_a_prefill_bucket_holds_prefix_and_padded_suffix(s, n):
    total = bucket_rows(n + suffix_bucket(s))
    assert total >= n + suffix_bucket(s)  # every padded row is written inside the static cache


@given(st.integers(min_value=1, max_value=200), st.integers(min_value=1, max_value=64))
def test_prefill_segments_cover_every_layer_once_in_order(layers, per):
    parts = segments(layers, per)
    assert [l for part in parts for l in part] == list(range(layers))
    assert all(1 <= len(part) <= per for part in parts)
    assert len(parts) == -(-layers // per)

"""The projection forms that write K/V in place (what a projection graph captures), and `widen`, which tells
where a graph of a padded length may write into a caller's destination.

Properties: the in-place form equals `llama_kv` bit for bit and writes nothing outside its destination; the
per-head GEMM form equals it to float32 rounding on every Llama-style variant (GQA, biases, K norm);
`widen` gives views over the destination's own storage, or None where its storage or capacity ends.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcache_adapter.projection.base import rotate_key
from hcache_adapter.projection.graphs import widen
from hcache_adapter.projection.llama import heads_linear, llama_kv, llama_kv_heads_into, llama_kv_into


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _args(seed: int, T: int, heads: int, kv_heads: int, hd: int, bias: bool, knorm: bool, style: str = "llama"):
    g = torch.Generator().manual_seed(seed)
    D = heads * hd
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)[None]
    return (r(1, T, D), r(D), 1e-6, style, r(kv_heads * hd, D) / D**0.5, r(kv_heads * hd) if bias else None,
            r(kv_heads * hd, D) / D**0.5, r(kv_heads * hd) if bias else None, r(hd) if knorm else None, 1e-6,
            ang.cos(), ang.sin(), hd, _rotate_half)


def _destination(kv_heads: int, total: int, hd: int, n: int):
    """A static cache's layer ([1, H, total, hd], filled with a marker) and its rows 0..n-1."""
    k = torch.full((1, kv_heads, total, hd), 7.0)
    v = torch.full((1, kv_heads, total, hd), 7.0)
    return (k, v), (k[:, :, :n], v[:, :, :n])


VARIANTS = st.tuples(st.integers(1, 40), st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 2)]), st.sampled_from([4, 8]),
                     st.booleans(), st.booleans(), st.sampled_from(["llama", "gemma"]), st.integers(0, 9))


@settings(max_examples=40, deadline=None)
@given(VARIANTS, st.integers(0, 5))
def test_in_place_form_equals_llama_kv_and_writes_only_its_rows(variant, spare):
    T, (heads, kv_heads), hd, bias, knorm, style, seed = variant
    args = _args(seed, T, heads, kv_heads, hd, bias, knorm, style)
    k_ref, v_ref = llama_kv(*args)
    (k_all, v_all), (k_out, v_out) = _destination(kv_heads, T + spare, hd, T)
    llama_kv_into(k_out, v_out, *args)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    assert (k_all[:, :, T:] == 7.0).all() and (v_all[:, :, T:] == 7.0).all()


@settings(max_examples=40, deadline=None)
@given(VARIANTS)
def test_per_head_gemm_form_equals_llama_kv(variant):
    T, (heads, kv_heads), hd, bias, knorm, style, seed = variant
    args = _args(seed, T, heads, kv_heads, hd, bias, knorm, style)
    k_ref, v_ref = llama_kv(*args)
    (k_all, v_all), (k_out, v_out) = _destination(kv_heads, T + 3, hd, T)
    llama_kv_heads_into(k_out, v_out, *args)
    torch.testing.assert_close(k_out, k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_out, v_ref, atol=1e-5, rtol=1e-5)
    assert (k_all[:, :, T:] == 7.0).all() and (v_all[:, :, T:] == 7.0).all()


def test_heads_linear_is_the_linear_in_the_caches_layout():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(1, 9, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    want = torch.nn.functional.linear(x, w, b).view(1, 9, 2, 4).transpose(1, 2)[0]
    torch.testing.assert_close(heads_linear(x, w, b, 4), want)
    out = torch.zeros(2, 12, 4)[:, :9]  # rows of a longer cache: batch stride 48, not 36
    assert heads_linear(x, w, None, 4, out=out[:, :9]).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w).view(1, 9, 2, 4).transpose(1, 2)[0])


def test_rotate_key_shapes_used_by_the_in_place_forms():
    args = _args(0, 5, 2, 2, 4, False, False)
    key = torch.randn(1, 2, 5, 4)
    assert rotate_key(key, args[10], args[11], _rotate_half).shape == key.shape


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4), st.integers(1, 64), st.integers(0, 64), st.integers(0, 80), st.integers(0, 80))
def test_widen_covers_the_destinations_rows_within_its_storage(heads, n, extra, rows_over, capacity_over):
    """widen(view of n rows, rows, capacity): views of the same storage and strides holding `rows` rows, the
    first n of them the view's own; None when rows passes the capacity or the storage's end."""
    total = n + extra
    base_k, base_v = torch.arange(heads * total * 2.0).view(1, heads, total, 2), torch.zeros(1, heads, total, 2)
    out = (base_k[:, :, :n], base_v[:, :, :n])
    rows, capacity = n + rows_over, n + capacity_over
    wide = widen(out, rows, capacity)
    if rows > capacity or rows > total:
        assert wide is None
        return
    assert wide is not None
    for w, base, o in zip(wide, (base_k, base_v), out):
        assert w.shape == (1, heads, rows, 2) and w.stride() == o.stride() and w.data_ptr() == o.data_ptr()
        assert torch.equal(w, base[:, :, :rows])


def test_widen_refuses_a_tensor_that_owns_exactly_its_rows_and_fewer_rows():
    out = (torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4))
    assert widen(out, 8, 8) is not None
    assert widen(out, 9, 100) is None  # the storage ends at row 8
    assert widen(out, 7, 100) is None  # fewer rows than the destination


def test_graphs_with_an_in_place_function_need_its_shapes():
    from hcache_adapter.projection.graphs import PrefixGraphs

    with pytest.raises(ValueError, match="kv_shape"):
        PrefixGraphs(lambda *a: None, lambda *a: None, fn_into=lambda *a: None)

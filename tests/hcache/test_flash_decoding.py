"""flash_decoding's Triton kernels (split-KV attention of a few queries over a long cache), run by Triton's
interpreter on a CPU (tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU): they equal eager
attention for every grouping, piece count, padding and fully masked piece, and generate through the static
prefill with them gives model.generate's tokens."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers.models import build as build_model

pytest.importorskip("triton")

from hcache_adapter import HCache, flash_decoding  # noqa: E402
from hcache_adapter.split_attention import NAME, eager_attention  # noqa: E402
from hstore import StoreConfig, TieredStore  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")


class _Layer(torch.nn.Module):
    is_causal = True


def _inputs(heads, kv_heads, queries, keys, dim, padding, dtype, seed):
    """Queries at positions n.. after n = keys - queries - padding prefix rows; the last `padding` rows of
    the cache are masked for every query (a static bucket's tail). The query is a transposed view."""
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, queries, heads, dim, generator=g).to(dev, dtype).transpose(1, 2)
    k = torch.randn(1, kv_heads, keys, dim, generator=g).to(dev, dtype)
    v = torch.randn(1, kv_heads, keys, dim, generator=g).to(dev, dtype)
    pos = torch.arange(queries, device=dev) + keys - queries - padding
    future = torch.arange(keys, device=dev).view(1, 1, 1, keys) > pos.view(1, 1, queries, 1)
    return q, k, v, future.to(dtype) * torch.finfo(dtype).min


def _reference(q, k, v, mask, scale):
    return eager_attention(_Layer().eval(), q.float(), k.float(), v.float(), mask.float(), scale, 0.0)[0]


@settings(max_examples=12, deadline=None)
@given(kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 3, 4]), queries=st.integers(1, 20),
       keys=st.integers(40, 900), padding=st.integers(0, 300), dim=st.sampled_from([16, 32]),
       seed=st.integers(0, 99))
def test_the_kernels_equal_eager_attention(kv_heads, groups, queries, keys, padding, dim, seed):
    padding = min(padding, keys - queries - 1)
    q, k, v, mask = _inputs(kv_heads * groups, kv_heads, queries, keys, dim, padding, torch.float32, seed)
    out = flash_decoding.attend(q, k, v, mask[0, 0], dim ** -0.5)
    ref = _reference(q, k, v, mask, dim ** -0.5)
    assert out.shape == ref.shape == (1, queries, kv_heads * groups, dim)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_pieces_past_every_query_are_skipped_and_weigh_nothing():
    """1,024 keys in 4 pieces of 256, the last 400 rows padding: the last piece sees no key at all."""
    assert flash_decoding.pieces_for(1024, 1, 64) == (4, 256)
    q, k, v, mask = _inputs(2, 1, 8, 1024, 16, 400, torch.float32, 1)
    out = flash_decoding.attend(q, k, v, mask[0, 0], 0.25)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, _reference(q, k, v, mask, 0.25), atol=1e-5, rtol=1e-5)


def test_more_rows_than_a_block_run_as_several_blocks():
    """4 query heads per K/V head over 40 new tokens: 160 rows, two blocks of 128."""
    assert flash_decoding.blocks_for(160, 16)[0] == flash_decoding.MAX_BLOCK_M == 128
    q, k, v, mask = _inputs(4, 1, 40, 300, 16, 20, torch.float32, 4)
    out = flash_decoding.attend(q, k, v, mask[0, 0], 0.25)
    assert torch.allclose(out, _reference(q, k, v, mask, 0.25), atol=1e-5, rtol=1e-5)


def test_half_precision_is_close_to_float32():
    q, k, v, mask = _inputs(4, 2, 6, 520, 32, 50, torch.float16, 2)
    out = flash_decoding.attend(q, k, v, mask[0, 0], 32 ** -0.5)
    assert out.dtype == torch.float16
    assert (out.float() - _reference(q, k, v, mask, 32 ** -0.5)).abs().max() < 2e-3


def test_shapes_it_cannot_take_are_refused():
    q, k, v, mask = _inputs(4, 2, 6, 100, 32, 0, torch.float32, 3)
    assert flash_decoding.supports(q, k, v, mask[0, 0])
    assert not flash_decoding.supports(q[..., :24], k[..., :24], v[..., :24], mask[0, 0])  # head size 24
    assert not flash_decoding.supports(q, k, v, mask[0, 0, :, :50])  # the bias covers fewer keys
    assert not flash_decoding.supports(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]), mask[0, 0])


@pytest.mark.parametrize("piece_blocks", [(4, 128, 128), (32, 128, 128), (128, 128, 64), (32, 256, 32)])
def test_blocks_and_pieces_fill_the_gpu(piece_blocks):
    rows, dim, block_n = piece_blocks
    block_m, bn, warps = flash_decoding.blocks_for(rows, dim)
    assert block_m >= max(16, rows) and bn == block_n and warps in (4, 8)
    pieces, per = flash_decoding.pieces_for(5120, 32, bn)
    assert per % bn == 0 and pieces * per >= 5120 and (pieces - 1) * per < 5120 and pieces * 32 >= 256


@pytest.mark.parametrize("arch", ["llama_mha", "llama_gqa"])
def test_generate_through_the_static_prefill_with_the_kernels_gives_the_models_tokens(arch, tmp_path, monkeypatch):
    """The static forward's attention runs the kernels (counted) and the tokens equal model.generate's. The
    model is a CPU one: the kernels run interpreted (on a GPU, test_gpu's generate tests run them compiled)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CPU model runs the kernels only under TRITON_INTERPRET=1")
    monkeypatch.setattr(flash_decoding, "available", lambda query: True)
    model = build_model(arch)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    calls = []
    real = flash_decoding.attend
    monkeypatch.setattr(flash_decoding, "attend", lambda *a: calls.append(a[1].shape[2]) or real(*a))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (1, 300), generator=g)
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, chunk_tokens=16, captured_prefill=True)
        hc.prefill.attention = NAME
        for extra in (0, 3):  # the first call saves; the second restores and runs the static forward
            req = torch.cat([ids, torch.randint(3, model.config.vocab_size, (1, 5 + extra), generator=g)], dim=1)
            assert torch.equal(hc.generate(req, **gen), model.generate(req, **gen)), extra
        assert hc.prefill.runs >= 1
    assert len(calls) >= model.config.num_hidden_layers and min(calls) >= 300

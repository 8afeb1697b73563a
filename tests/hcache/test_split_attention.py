"""Split-KV attention (the captured prefill's attention over a long prefix): the pieces merge into exact
attention, the piece count is a usable divisor, and generate through the static path with it gives
model.generate's tokens. CPU, float32: the pieces run as explicit math (on a GPU, the fused kernel)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers.models import build as build_model

from hcache_adapter import HCache
from hcache_adapter import split_attention
from hcache_adapter.split_attention import (ALIGN, MIN_PIECE, NAME, attend, choose_splits, eager_attention,
                                            split_kv_attention)
from hstore import StoreConfig, TieredStore


class _Layer(torch.nn.Module):
    is_causal = True


def _inputs(heads, kv_heads, queries, keys, dim, seed, prefix=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, queries, dim, generator=g)
    k = torch.randn(1, kv_heads, keys, dim, generator=g)
    v = torch.randn(1, kv_heads, keys, dim, generator=g)
    n = keys - queries if prefix is None else prefix  # the new tokens sit after n prefix rows; the rest is padding
    pos = torch.arange(queries) + n
    future = torch.arange(keys).view(1, 1, 1, keys) > pos.view(1, 1, queries, 1)
    mask = future.float() * torch.finfo(torch.float32).min
    return q, k, v, mask


@settings(max_examples=60, deadline=None)
@given(kv_heads=st.sampled_from([1, 2, 4]), groups=st.sampled_from([1, 2, 4]), queries=st.integers(1, 40),
       pieces=st.integers(1, 12), piece=st.integers(1, 48), dim=st.sampled_from([8, 16]), seed=st.integers(0, 99))
def test_merged_pieces_equal_attention_over_all_keys(kv_heads, groups, queries, pieces, piece, dim, seed):
    keys = pieces * piece
    if keys < queries:
        keys = queries * pieces
    q, k, v, mask = _inputs(kv_heads * groups, kv_heads, queries, keys, dim, seed)
    ref = eager_attention(_Layer().eval(), q, k, v, mask, dim ** -0.5, 0.0)[0]
    out = attend(q, k, v, mask, dim ** -0.5, pieces).transpose(1, 2)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_a_mask_longer_than_the_keys_is_cut_to_them(monkeypatch):
    """The cache may hold fewer rows than the mask covers: only the first len(keys) columns count."""
    merged = []
    real = split_attention.attend
    monkeypatch.setattr(split_attention, "attend", lambda *a: merged.append(real(*a)) or merged[-1])
    q, k, v, mask = _inputs(4, 2, 8, 1024, 8, 3)
    longer = torch.cat([mask, torch.zeros(1, 1, 8, 64)], dim=-1)
    out, _ = split_kv_attention(_Layer().eval(), q, k, v, longer, 0.35)
    ref = eager_attention(_Layer().eval(), q, k, v, mask, 0.35, 0.0)[0]
    assert len(merged) == 1 and torch.allclose(out, ref, atol=1e-5)  # split, not the eager fall-back


def test_a_piece_count_that_does_not_divide_the_keys_is_refused():
    q, k, v, mask = _inputs(2, 2, 4, 30, 8, 0)
    with pytest.raises(ValueError, match="do not split"):
        attend(q, k, v, mask, 0.3, 4)


@given(keys=st.integers(1, 1 << 17), kv_heads=st.sampled_from([1, 2, 8, 32]), queries=st.integers(1, 512))
def test_the_piece_count_divides_the_keys_and_keeps_pieces_long(keys, kv_heads, queries):
    s = choose_splits(keys, kv_heads, queries)
    assert s >= 1 and keys % s == 0
    assert s == 1 or (keys // s >= MIN_PIECE and (keys // s) % ALIGN == 0)


def test_the_7b_shapes_get_pieces_that_fill_the_gpu():
    """32 K/V heads, 32 queries: 8 pieces (256 blocks) for the 4K and 16K buckets; the 8B's 8 K/V heads
    with 4 queries heads each: 16 pieces."""
    assert choose_splits(5120, 32, 32) == 8
    assert choose_splits(20480, 32, 32) == 8
    assert choose_splits(5120, 8, 128) == 16
    assert choose_splits(256, 32, 32) == 1  # too short to split: eager


@pytest.mark.parametrize("case", ["no mask", "batch of two", "short"])
def test_calls_it_does_not_take_run_eager_attention(case):
    q, k, v, mask = _inputs(4, 2, 8, 1024, 8, 1)
    if case == "no mask":
        mask = None
    elif case == "batch of two":
        q, k, v, mask = (torch.cat([t, t]) for t in (q, k, v, mask))
    else:
        q, k, v, mask = _inputs(4, 2, 8, 64, 8, 1)
    out, weights = split_kv_attention(_Layer().eval(), q, k, v, mask, 0.35)
    ref = eager_attention(_Layer().eval(), q, k, v, mask, 0.35, 0.0)[0]
    assert weights is None and torch.equal(out, ref)


@pytest.mark.parametrize("arch", ["llama_mha", "llama_gqa"])
def test_generate_through_the_static_prefill_with_split_attention_gives_the_models_tokens(arch, tmp_path, monkeypatch):
    """A prefix long enough for a static cache of >= 2 pieces: the static forward's attention runs split
    (counted), every layer's, and the tokens equal model.generate's; the model's attention is put back."""
    model = build_model(arch)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    before = getattr(model.config, "_attn_implementation")
    split = []
    real = split_attention.attend
    monkeypatch.setattr(split_attention, "attend", lambda *a: split.append(a[-1]) or real(*a))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (1, 2 * MIN_PIECE + 40), generator=g)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, chunk_tokens=16, captured_prefill=True)
        hc.prefill.attention = NAME  # registered when the static forward first runs
        for extra in (0, 3, 7):  # the first call saves; the others restore and run the static forward
            req = torch.cat([ids, torch.randint(3, model.config.vocab_size, (1, 5 + extra), generator=g)], dim=1)
            assert torch.equal(hc.generate(req, **gen), model.generate(req, **gen)), extra
        assert hc.prefill.runs >= 2
    assert len(split) >= 2 * model.config.num_hidden_layers and min(split) >= 2
    assert getattr(model.config, "_attn_implementation") == before
    assert NAME == hc.prefill.attention


def test_the_default_is_split_attention_when_capturing_and_eager_otherwise():
    from hcache_adapter.prefill_graph import CapturedPrefill

    model = build_model("llama_mha")
    layers = list(model.model.layers)
    assert CapturedPrefill(model, layers, "past_key_values", None, capture=True).attention == NAME
    assert CapturedPrefill(model, layers, "past_key_values", None, capture=False).attention == "eager"
    assert CapturedPrefill(model, layers, "past_key_values", None, attention=None).attention is None


def test_a_kernel_that_refuses_the_inputs_leaves_eager_attention_for_good(monkeypatch, caplog):
    """Outside a capture, a piece kernel's error is logged once and eager attention answers, then and after."""
    monkeypatch.setattr(split_attention, "_fused_failed", False)

    def refuse(*args):
        raise RuntimeError("no kernel for these inputs")

    monkeypatch.setattr(split_attention, "_pieces", refuse)
    q, k, v, mask = _inputs(4, 2, 8, 1024, 8, 2)
    ref = eager_attention(_Layer().eval(), q, k, v, mask, 0.35, 0.0)[0]
    for _ in range(2):
        out, _ = split_kv_attention(_Layer().eval(), q, k, v, mask, 0.35)
        assert torch.equal(out, ref)
    assert caplog.text.count("split-KV attention failed") == 1


def test_a_model_module_it_does_not_take_runs_its_own_eager_attention(monkeypatch):
    """The fall-back is the model's own eager attention (its modeling file's), as "eager" would run it."""
    from transformers.models.llama import modeling_llama

    calls = []
    own = modeling_llama.eager_attention_forward
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", lambda *a, **kw: calls.append(kw) or own(*a, **kw))
    attn = build_model("llama_gqa").model.layers[0].self_attn.eval()
    heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
    q, k, v, mask = (torch.cat([t, t]) for t in _inputs(heads, kv_heads, 8, 64, attn.head_dim, 4))  # batch of two
    out, _ = split_kv_attention(attn, q, k, v, mask, scaling=attn.scaling, dropout=0.0)
    assert calls == [dict(scaling=attn.scaling, dropout=0.0)]
    ref = own(attn, q, k, v, mask, scaling=attn.scaling, dropout=0.0)[0]
    assert torch.equal(out, ref)

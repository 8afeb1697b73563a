"""Batched generate: every row of a left-padded batch restores its own prefix and the batch gives
exactly model.generate's output; a row's state is saved only from an unpadded computation of it.

Tiny random models (several architectures), float32, CPU, 8-token chunks.
"""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers.models import CASES as ALL_CASES
from tests.helpers.models import build as build_model

from hcache_adapter import HCache
from hcache_adapter.compat import cache_kwarg, new_cache
from hcache_adapter.generation import inspect_call
from hcache_adapter.serving.rows import left_padding, row_spans, shared_columns
from hstore import StoreConfig, TieredStore

C = 8
ARCHS = ["llama_mha", "llama_gqa", "qwen3_gqa_knorm", "gpt2", "opt_pre_ln", "gpt_neox_partial_rotary",
         "falcon_mha_alibi_bias", "phi3_gqa"]
ALL_ARCHS = sorted(ALL_CASES)
GREEDY = dict(max_new_tokens=5, do_sample=False)
SAMPLED = dict(max_new_tokens=5, do_sample=True, top_k=20, temperature=0.9)


@pytest.fixture
def store(tmp_path):
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=8 << 20, nvme_bytes=32 << 20)) as s:
        yield s


def build(arch):
    model = build_model(arch)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id  # never infer a mask
    return model


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n,), generator=g).tolist()


def left_padded(rows, pad_id=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


def same_as_model(hc, model, rows, gen, seed=7):
    ids, mask = left_padded(rows)
    torch.manual_seed(seed)
    out = hc.generate(ids, attention_mask=mask, **gen)
    torch.manual_seed(seed)
    ref = model.generate(ids, attention_mask=mask, **gen)
    seqs, ref_seqs = (out.sequences, ref.sequences) if hasattr(out, "sequences") else (out, ref)
    assert torch.equal(seqs, ref_seqs)
    return seqs


@torch.no_grad()
def assert_restores_own_prefill(hc, model, row):
    """What is stored for `row` restores to the model's own prefill of the row alone (unpadded)."""
    ids = torch.tensor([row])
    result = hc.restore(ids)
    n = result.tokens
    assert n > 0
    ref = new_cache(model)
    model(ids[:, :n], use_cache=True, **{cache_kwarg(model): ref})
    for mine, theirs in zip(result.cache.layers, ref.layers):
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-5)
        assert torch.allclose(mine.values, theirs.values, atol=1e-5)


CASES = ([(arch, "hcache", "greedy") for arch in ALL_ARCHS] + [(arch, "kv", "greedy") for arch in ARCHS]
         + [(arch, "hcache", "sampled") for arch in ARCHS[::2]])


@pytest.mark.parametrize("arch,method,mode", CASES)
def test_batch_restores_every_row_and_matches_the_model(arch, method, mode, store):
    gen = GREEDY if mode == "greedy" else SAMPLED
    model = build(arch)
    hc = HCache(model, store, method=method, chunk_tokens=C)
    rows = [tokens(30, 1), tokens(13, 2), tokens(22, 3)]
    first = same_as_model(hc, model, rows, gen)
    for row in rows:
        assert_restores_own_prefill(hc, model, row)
    T = first.shape[1] - gen["max_new_tokens"]
    # next round: each row's real tokens plus its output plus new tokens of different lengths
    follow = [[t for t in first[b, T - len(r):].tolist()] + tokens(3 + 4 * b, 10 + b) for b, r in enumerate(rows)]
    before = hc.stats.restored_tokens
    same_as_model(hc, model, follow, gen, seed=8)
    assert hc.stats.restored_tokens - before == sum((len(r) - 1) // C * C for r in rows)


def test_rows_without_prefix_different_prefixes_and_identical_rows(store):
    model = build("llama_gqa")
    hc = HCache(model, store, chunk_tokens=C)
    a, b = tokens(40, 1), tokens(20, 2)
    same_as_model(hc, model, [a], GREEDY)  # stores 5 chunks of a
    same_as_model(hc, model, [b[:17]], GREEDY)  # stores 2 chunks of b
    rows = [a + tokens(6, 3), tokens(5, 4), b, tokens(33, 5), a + tokens(6, 3)]  # the last repeats the first
    before = hc.stats.restored_tokens
    same_as_model(hc, model, rows, GREEDY)
    # a's 40 tokens (twice, the second time including what the first row saved), b's 16
    assert hc.stats.restored_tokens - before >= 40 + 16 + 40
    for row in rows:
        if len(row) > C:
            assert_restores_own_prefill(hc, model, row)


@pytest.mark.parametrize("gen", [dict(max_new_tokens=4, num_beams=2, do_sample=False),
                                 dict(max_new_tokens=4, do_sample=True, num_return_sequences=2),
                                 dict(max_new_tokens=4, do_sample=False, cache_implementation="static"),
                                 dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                      output_scores=True)],
                         ids=["beams", "return_sequences", "static", "dict"])
def test_batch_generation_modes(gen, store):
    model = build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C)
    rows = [tokens(27, 1), tokens(18, 2)]
    same_as_model(hc, model, rows, dict(max_new_tokens=2, do_sample=False))
    before = hc.stats.restored_tokens
    same_as_model(hc, model, [r + tokens(4, 9) for r in rows], gen)
    assert hc.stats.restored_tokens - before == 24 + 16


@pytest.mark.parametrize("method", ["auto", "recompute"])
def test_batch_with_auto_and_recompute(method, store):
    model = build("llama_gqa")
    hc = HCache(model, store, method=method, chunk_tokens=C, plan="HK" if method == "auto" else None,
                gpu_context_bytes=1 << 20 if method == "recompute" else None)
    rows = [tokens(26, 1), tokens(11, 2)]
    same_as_model(hc, model, rows, GREEDY)
    same_as_model(hc, model, [r + tokens(3, 5) for r in rows], GREEDY)
    if method == "recompute":
        assert hc.stats.gpu_hits == 2
    else:
        assert hc.stats.restored_tokens == 24 + 8


def test_pad_tokens_without_a_mask_are_inferred_as_left_padding(store):
    model = build_model("llama_mha")  # pad 0 != eos 2: generate() infers the mask from pad tokens
    hc = HCache(model, store, chunk_tokens=C)
    rows = [tokens(25, 1), tokens(12, 2)]
    ids, _ = left_padded(rows, pad_id=model.generation_config.pad_token_id)
    call = inspect_call(model, ids, {})
    assert call.restorable and call.pads == (0, 13)
    assert torch.equal(hc.generate(ids, **GREEDY), model.generate(ids, **GREEDY))
    assert hc.restore(torch.tensor([rows[1]])).tokens == 8


def test_masks_other_than_left_padding_pass_through(store, caplog):
    model = build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C)
    ids, mask = left_padded([tokens(20, 1), tokens(20, 2)])
    mask[1, 4] = 0  # a hole
    with caplog.at_level(logging.DEBUG, logger="hcache_adapter.hcache"):
        out = hc.generate(ids, attention_mask=mask, **GREEDY)
    assert "other than by left padding" in caplog.text
    assert torch.equal(out, model.generate(ids, attention_mask=mask, **GREEDY))
    assert hc.stats.restores == 0 and len(store) == 0


def test_single_row_with_left_padding_restores(store):
    model = build("llama_gqa")
    hc = HCache(model, store, chunk_tokens=C)
    row = tokens(25, 1)
    same_as_model(hc, model, [row], GREEDY)
    ids, mask = left_padded([row])
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), mask], 1)
    before = hc.stats.restored_tokens
    assert torch.equal(hc.generate(ids, attention_mask=mask, **GREEDY),
                       model.generate(ids, attention_mask=mask, **GREEDY))
    assert hc.stats.restored_tokens - before == 24


def test_caller_cache_with_a_batch_is_respected(store, caplog):
    model = build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C)
    ids, mask = left_padded([tokens(20, 1), tokens(12, 2)])
    with caplog.at_level(logging.DEBUG, logger="hcache_adapter.hcache"):
        out = hc.generate(ids, attention_mask=mask, **GREEDY, **{cache_kwarg(model): new_cache(model)})
    assert "the caller passed a cache" in caplog.text
    assert torch.equal(out, model.generate(ids, attention_mask=mask, **GREEDY))
    assert len(store) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 70), min_size=1, max_size=6), st.integers(0, 5), st.integers(1, 16))
def test_shared_columns_hold_every_whole_chunk_and_leave_a_token(lengths, extra, chunk):
    T = max(lengths) + extra
    pads = [T - n for n in lengths]
    mask = [[0] * p + [1] * (T - p) for p in pads]
    assert left_padding(mask) == pads
    spans = row_spans(pads, T, chunk)
    P = shared_columns(spans)
    assert P <= T - 1
    for s in spans:
        assert s.whole % chunk == 0 and s.whole < s.length
        assert s.whole <= s.held(P) <= s.length - 1  # every stored chunk fits; one token left to run
        assert s.pad + s.held(P) == max(P, s.pad)


@given(st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=8), min_size=1, max_size=4))
def test_left_padding_accepts_only_zeros_then_ones(mask):
    pads = left_padding(mask)
    ok = all(1 in row and all(row[row.index(1):]) for row in mask)
    assert (pads is not None) == ok
    if ok:
        assert pads == [row.index(1) for row in mask]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["hcache", "kv", "auto"])
def test_batch_on_the_gpu(method, tmp_path):
    """Lazy per-row restores on side streams, the unpadded row prefill and the merge, on a GPU (float32)."""
    model = build("llama_gqa").cuda()
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=8 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method=method, chunk_tokens=C, plan="HK" if method == "auto" else None)
        rows = [tokens(30, 1), tokens(13, 2), tokens(22, 3)]
        for rnd in range(2):
            ids, mask = left_padded(rows)
            ids, mask = ids.cuda(), mask.cuda()
            out = hc.generate(ids, attention_mask=mask, **GREEDY)
            assert torch.equal(out, model.generate(ids, attention_mask=mask, **GREEDY))
            T = ids.shape[1]
            rows = [out[b, T - len(r):].tolist() + tokens(4, 20 + b) for b, r in enumerate(rows)]
        assert hc.stats.restored_tokens > 0

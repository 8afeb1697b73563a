"""GPU-resident contexts: hits restore nothing and give model.generate's tokens, the budget is never
exceeded, hstore's policies choose what is evicted, and an evicted context comes back from the store.

Tiny random models, float32, CPU (the "GPU" here is the model's device), 8-token chunks.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers.models import build as build_model

from hcache_adapter import HCache, Profile
from hcache_adapter.layout import StateLayout
from hcache_adapter.serving.resident import GPU_SOURCE, ResidentContexts
from hstore import StoreConfig, TieredStore
from hstore.errors import StoreConfigError

C = 8
GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture
def store(tmp_path):
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=8 << 20, nvme_bytes=32 << 20)) as s:
        yield s


@pytest.fixture
def model():
    m = build_model("llama_gqa")
    m.generation_config.pad_token_id = m.generation_config.eos_token_id
    return m


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, n), generator=g)


def context_bytes(model, n):
    """K/V bytes of n tokens for the tiny GQA model (2 layers, 2 heads of 16, float32)."""
    cfg = model.config
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4 * n


def turn(hc, model, ids, **gen):
    gen = {**GEN, **gen}
    gen["min_new_tokens"] = gen["max_new_tokens"]  # no early end of sequence: known context lengths
    out = hc.generate(ids, **gen)
    ref = model.generate(ids, **gen)
    assert torch.equal(getattr(out, "sequences", out), getattr(ref, "sequences", ref))
    return getattr(out, "sequences", out)


def test_next_turn_starts_from_the_resident_context(model, store):
    hc = HCache(model, store, chunk_tokens=C, gpu_context_bytes=1 << 20)
    out = turn(hc, model, tokens(21, 1))  # 25 tokens: 24 held by the cache -> 3 chunks resident
    assert hc.stats.gpu_entries == 1 and hc.stats.gpu_bytes == context_bytes(model, 24)
    restored = hc.stats.restored_tokens
    turn(hc, model, torch.cat([out, tokens(5, 2)], 1))
    assert hc.last_restore.tokens == 24 and GPU_SOURCE in hc.last_restore.sources
    assert hc.stats.gpu_hits == 1 and hc.stats.restored_tokens == restored  # nothing loaded from the store
    assert hc.stats.gpu_entries == 1 and hc.stats.gpu_superseded == 1  # the longer context replaced the first


@pytest.mark.parametrize("gen", [dict(num_beams=2), dict(cache_implementation="static"),
                                 dict(do_sample=True, num_return_sequences=2)],
                         ids=["beams", "static", "return_sequences"])
def test_a_hit_is_shared_and_never_written(model, store, gen):
    hc = HCache(model, store, chunk_tokens=C, gpu_context_bytes=1 << 20)
    ids = tokens(30, 1)
    turn(hc, model, ids, max_new_tokens=3)
    hit = hc.restore(ids)
    assert GPU_SOURCE in hit.sources
    before = [(l.keys.clone(), l.values.clone()) for l in hit.cache.layers]
    torch.manual_seed(0)
    out = hc.generate(torch.cat([ids, tokens(4, 3)], 1), max_new_tokens=4, min_new_tokens=4, **gen)
    torch.manual_seed(0)
    ref = model.generate(torch.cat([ids, tokens(4, 3)], 1), max_new_tokens=4, min_new_tokens=4, **gen)
    assert torch.equal(out, ref)
    assert GPU_SOURCE in hc.last_restore.sources
    for (k, v), layer in zip(before, hit.cache.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_budget_is_never_exceeded_and_evicted_contexts_come_back_from_the_store(model, store):
    budget = context_bytes(model, 56)  # two 24-token contexts fit, not three
    hc = HCache(model, store, chunk_tokens=C, gpu_context_bytes=budget)
    sessions = {s: tokens(21, s) for s in range(4)}
    for rnd in range(3):
        for s in sessions:
            out = turn(hc, model, sessions[s][:, :21 + 8 * rnd] if rnd == 0 else sessions[s])
            sessions[s] = torch.cat([out, tokens(4, 10 * rnd + s)], 1)
            assert 0 < hc.stats.gpu_bytes <= budget
    assert hc.stats.gpu_evictions > 0
    assert hc.stats.restored_tokens > 0  # sessions evicted from the GPU were restored from the store


def test_lru_keeps_what_was_used_last(model, store):
    hc = HCache(model, store, chunk_tokens=C, gpu_context_bytes=context_bytes(model, 48), gpu_context_policy="lru")
    a, b, c = (tokens(21, s) for s in (1, 2, 3))
    turn(hc, model, a)
    turn(hc, model, b)
    assert hc.restore(torch.cat([a, tokens(3, 9)], 1)).sources.get(GPU_SOURCE)  # a used: b is the oldest now
    turn(hc, model, c)  # evicts b
    assert GPU_SOURCE in hc.restore(torch.cat([a, tokens(3, 9)], 1)).sources
    assert GPU_SOURCE not in hc.restore(torch.cat([b, tokens(3, 9)], 1)).sources


@pytest.mark.parametrize("policy", ["s3fifo", "cost"])
def test_other_hstore_policies_enforce_the_budget(model, store, policy):
    profile = Profile(n_layers=2, hidden_bytes_per_token=256, kv_bytes_per_token=256, read_bytes_per_s={"dram": 1e9},
                      project_coef=(1e-5, 1e-7), recompute_coef=(1e-4, 1e-6, 1e-9))
    budget = context_bytes(model, 64)
    hc = HCache(model, store, chunk_tokens=C, gpu_context_bytes=budget, gpu_context_policy=policy, profile=profile)
    for s in range(6):
        turn(hc, model, tokens(13 + 8 * s, s))
        assert hc.stats.gpu_bytes <= budget
    assert hc.stats.gpu_evictions > 0


def test_a_context_larger_than_the_budget_is_not_kept(model, store):
    hc = HCache(model, store, chunk_tokens=C, gpu_context_bytes=context_bytes(model, 16))
    turn(hc, model, tokens(30, 1))
    assert hc.stats.gpu_rejected == 1 and hc.stats.gpu_entries == 0 and hc.stats.gpu_bytes == 0
    hc0 = HCache(model, store, chunk_tokens=C, namespace="zero", gpu_context_bytes=0)
    turn(hc0, model, tokens(30, 1))
    assert hc0.stats.gpu_entries == 0 and hc0.stats.gpu_misses == 1


def test_a_shared_document_prefix_is_served_to_other_questions(model, store):
    hc = HCache(model, store, chunk_tokens=C, gpu_context_bytes=1 << 20)
    doc = tokens(40, 1)
    turn(hc, model, torch.cat([doc, tokens(6, 2)], 1))
    turn(hc, model, torch.cat([doc, tokens(9, 3)], 1))
    assert hc.last_restore.tokens == 40 and GPU_SOURCE in hc.last_restore.sources


def test_a_resident_prefix_shorter_than_the_stored_one_is_not_used(model, store):
    hc = HCache(model, store, chunk_tokens=C, gpu_context_bytes=1 << 20)
    ids = tokens(45, 1)
    hc.save(ids)  # 40 tokens stored, nothing resident
    turn(hc, model, ids[:, :20])  # 16 resident (and stored)
    turn(hc, model, torch.cat([ids, tokens(3, 2)], 1))
    assert hc.last_restore.tokens == 40 and GPU_SOURCE not in hc.last_restore.sources


def test_recompute_with_resident_contexts(model, store):
    hc = HCache(model, store, method="recompute", chunk_tokens=C, gpu_context_bytes=1 << 20)
    out = turn(hc, model, tokens(21, 1))
    turn(hc, model, torch.cat([out, tokens(5, 2)], 1))
    assert hc.stats.gpu_hits == 1 and hc.stats.gpu_hit_tokens == 24
    assert len(store) == 0  # "recompute" stores nothing


def test_bad_budget_is_refused(model, store):
    with pytest.raises(StoreConfigError):
        HCache(model, store, gpu_context_bytes=-1)
    with pytest.raises(StoreConfigError):
        HCache(model, store, gpu_context_bytes=1 << 20, gpu_context_policy="nope")


LAYOUT = StateLayout("fp", "t", 4, torch.float32, 8, (1,), (2,))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40)), min_size=1, max_size=30),
       st.integers(0, 2000), st.sampled_from(["lru", "s3fifo", "cost"]))
def test_resident_accounting_under_any_sequence(ops, budget, policy):
    """Any admit sequence: bytes resident equal the entries' bytes and stay within the budget; every
    prefix of an admitted context that fits is found."""
    rc = ResidentContexts(budget, LAYOUT, None, policy=policy)
    base = {s: torch.randint(0, 100, (60,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(6)}
    for s, n in ops:
        kv = torch.randn(1, 1, n, 2)
        kept = rc.admit(base[s], [(kv, kv)], n)
        assert rc.used <= budget and rc.used == rc.stats.gpu_bytes
        w = n // 4 * 4
        if kept and w:
            assert rc.longest(base[s][: w + 1]) == w
    rc.clear()
    assert rc.used == 0 and len(rc) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resident_hits_on_the_gpu_with_the_captured_prefill(tmp_path):
    """On a GPU (captured first forward on by default) hits give model.generate's tokens."""
    m = build_model("llama_gqa").cuda()
    m.generation_config.pad_token_id = m.generation_config.eos_token_id
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=8 << 20, nvme_bytes=0)) as store:
        hc = HCache(m, store, chunk_tokens=C, gpu_context_bytes=1 << 20)
        ids = tokens(21, 1).cuda()
        for rnd in range(4):
            out = turn(hc, m, ids)
            ids = torch.cat([out, tokens(5, 2 + rnd).cuda()], 1)
        assert hc.stats.gpu_hits == 3 and hc.stats.restored_tokens == 0
        assert type(hc.restore(ids, lazy=True).cache).__name__ == "LazyCache"  # what the captured prefill takes

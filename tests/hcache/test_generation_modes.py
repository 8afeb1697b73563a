"""hc.generate restores under every generation mode and gives model.generate's tokens.

Each test saves a prompt through one call, then extends it and generates again:
the second call starts from the restored prefix (checked) and must equal
`model.generate` on the same tokens. Tiny random models, float32, CPU.
"""
from __future__ import annotations

import logging

import pytest
import torch
from tests.helpers.caches import assert_holds_models_state
from tests.helpers.models import build as build_model

from hcache_adapter import HCache, Profile
from hcache_adapter.compat import cache_kwarg, chunked_prefill_respects_cache, new_cache
from hcache_adapter.lazycache import LazyCache, LazyLayer
from hstore import StoreConfig, TieredStore

C = 8


@pytest.fixture
def store(tmp_path):
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=4 << 20, nvme_bytes=32 << 20)) as s:
        yield s


def build(arch):
    """A tiny model whose generate() never infers a padding mask (pad = eos), so that generated tokens that
    happen to equal the pad id do not make the next round's prompt unrestorable (see the padding test)."""
    model = build_model(arch)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    return model


def prompt(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, n), generator=g)


def two_rounds(hc, model, gen, *, seed=0):
    """First call saves; the second, on an extended prompt, restores. Both equal model.generate."""
    ids = prompt(model, 21, seed)
    for rnd in range(2):
        torch.manual_seed(100 + rnd)
        out = hc.generate(ids, **gen)
        torch.manual_seed(100 + rnd)
        ref = model.generate(ids, **gen)
        seqs, ref_seqs = (out.sequences, ref.sequences) if hasattr(out, "sequences") else (out, ref)
        assert torch.equal(seqs, ref_seqs), f"round {rnd}"
        if rnd and not (gen.get("prefill_chunk_size") and not chunked_prefill_respects_cache()):
            assert hc.last_restore.tokens > 0
        ids = torch.cat([seqs[:1], prompt(model, 5, seed + 10 + rnd)], dim=1)
    return out, ref


MODES = {
    "greedy": dict(max_new_tokens=6, do_sample=False),
    "sampling": dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8),
    "beam_search": dict(max_new_tokens=5, num_beams=3, do_sample=False),
    "beam_sample": dict(max_new_tokens=5, num_beams=2, do_sample=True, num_return_sequences=2),
    "return_sequences": dict(max_new_tokens=5, do_sample=True, num_return_sequences=3),
    "static_cache": dict(max_new_tokens=6, do_sample=False, cache_implementation="static"),
    "dict_with_scores": dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True),
    "repetition_penalty": dict(max_new_tokens=6, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2),
    "chunked_prefill": dict(max_new_tokens=4, do_sample=False, prefill_chunk_size=4),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("method", ["hcache", "kv"])
def test_every_generation_mode_restores_and_matches(mode, method, store):
    model = build("llama_gqa")
    hc = HCache(model, store, method=method, chunk_tokens=C)
    out, ref = two_rounds(hc, model, MODES[mode])
    if MODES[mode].get("output_scores"):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out.scores, ref.scores))


def test_model_level_static_cache_config_is_honoured(store):
    """A model whose generation_config asks for a static cache: generate() would refuse a cache as well."""
    model = build("llama_mha")
    model.generation_config.cache_implementation = "static"
    hc = HCache(model, store, chunk_tokens=C)
    two_rounds(hc, model, dict(max_new_tokens=5, do_sample=False))
    assert model.generation_config.cache_implementation == "static"  # the model's config is left as it was


def test_assisted_decoding_restores_the_main_models_prefix(store):
    model = build("llama_mha")
    torch.manual_seed(3)
    assistant = build("llama_gqa")  # same vocabulary, other weights: drafts get rejected now and then
    hc = HCache(model, store, chunk_tokens=C)
    two_rounds(hc, model, dict(max_new_tokens=8, do_sample=False, assistant_model=assistant))


def test_caller_cache_is_respected_and_logged(store, caplog):
    model = build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C)
    ids = prompt(model, 20)
    hc.generate(ids, max_new_tokens=2, do_sample=False)
    own = new_cache(model)
    with caplog.at_level(logging.DEBUG, logger="hcache_adapter.hcache"):
        out = hc.generate(ids, max_new_tokens=3, do_sample=False, **{cache_kwarg(model): own})
    assert "the caller passed a cache" in caplog.text
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False))


def test_lazy_restore_hands_layers_over_only_when_the_model_asks(store):
    model = build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C)
    ids = prompt(model, 30)
    hc.generate(ids, max_new_tokens=2, do_sample=False)
    eager = hc.restore(ids)
    assert eager.tokens == 24
    lazy = hc.restorer.restore(ids, hc.digests(ids[0, :24]), eager.plan, 0, lazy=True)
    cache, valid, release = lazy
    try:
        assert isinstance(cache, LazyCache) and valid == 3
        assert cache.pending_layers == list(range(hc.num_layers))
        assert cache.get_seq_length() == 24  # known before any layer is read
        with torch.no_grad():
            model(ids[:, 24:], use_cache=True, **{cache_kwarg(model): cache})
        assert cache.pending_layers == []
        for mine, ref in zip(cache.layers, eager.cache.layers):
            assert isinstance(mine, LazyLayer)
            assert torch.allclose(mine.keys[..., :24, :], ref.keys, atol=1e-6)
            assert torch.allclose(mine.values[..., :24, :], ref.values, atol=1e-6)
    finally:
        release()


def test_lazy_layer_behaves_like_a_dynamic_layer_before_and_after_it_is_taken(store):
    model = build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C)
    ids = prompt(model, 30)
    hc.generate(ids, max_new_tokens=2, do_sample=False)
    plan = hc.restore(ids).plan
    cache, _, release = hc.restorer.restore(ids, hc.digests(ids[0, :24]), plan, 0, lazy=True)
    try:
        cache.crop(-8)  # touches every layer: each is fetched first, then cropped like a DynamicLayer
        assert cache.get_seq_length() == 16 and cache.pending_layers == []
        cache.batch_repeat_interleave(2)
        assert cache.layers[0].keys.shape[0] == 2
        cache.reorder_cache(torch.tensor([1, 0]))
        cache.batch_select_indices(torch.tensor([0]))
        assert cache.layers[0].keys.shape[0] == 1
    finally:
        release()


def test_unreadable_chunk_found_during_generate_is_recomputed_not_served(tmp_path, caplog):
    """A lazy restore commits to its length before reading: a layer that then cannot be read is
    recomputed from tokens, so generate() still gives the model's own tokens."""
    model = build("llama_mha")
    root = tmp_path / "s"
    ids = prompt(model, 30)
    with TieredStore(StoreConfig(root=root, dram_bytes=4 << 20, nvme_bytes=32 << 20)) as store:
        hc = HCache(model, store, chunk_tokens=C)
        hc.generate(ids, max_new_tokens=2, do_sample=False)
        store.flush()
        plan = hc.restore(ids).plan  # planned while every chunk was there ...
        assert store.delete(hc.layout.chunk_key(hc.digests(ids[0, :24])[1], "H", 1))  # ... then one vanishes
        cache, valid, release = hc.restorer.restore(ids, hc.digests(ids[0, :24]), plan, 0, lazy=True)
        assert valid == 3 and cache.get_seq_length() == 24  # the length is committed before reading
        try:
            with caplog.at_level(logging.WARNING), torch.no_grad():
                model(ids[:, 24:], use_cache=True, **{cache_kwarg(model): cache})
        finally:
            release()
        assert "recomputing it from tokens" in caplog.text
        ref = new_cache(model)
        with torch.no_grad():
            model(ids, use_cache=True, **{cache_kwarg(model): ref})
        for mine, theirs in zip(cache.layers, ref.layers):
            assert torch.allclose(mine.keys, theirs.keys, atol=1e-5)
            assert torch.allclose(mine.values, theirs.values, atol=1e-5)


@pytest.mark.parametrize("mode", ["greedy", "sampling", "dict_with_scores", "repetition_penalty"])
@pytest.mark.parametrize("arch,method", [("llama_gqa", "hcache"), ("qwen3_gqa_knorm", "kv"), ("gpt2", "hcache"),
                                         ("llama_mha", "auto")])
def test_static_shape_prefill_gives_the_models_tokens(mode, arch, method, store):
    """The captured prefill's static path (padded suffix, static cache, positions, 4D mask, hidden states
    handed to the saver), run eagerly on the CPU: the same tokens, and the saved state restores."""
    model = build(arch)
    plan = "HK" if method == "auto" else None  # a mixed plan, read from DRAM: restored, never recomputed
    dear = Profile(2, 1, 1, {"dram": 1e12, "nvme": 1e9}, (0.0, 1e-12), (1.0, 0.0, 0.0))  # recomputing: 1 s a layer
    hc = HCache(model, store, method=method, chunk_tokens=C, captured_prefill=True, plan=plan,
                profile=dear if method == "auto" else None)
    assert hc.prefill is not None
    two_rounds(hc, model, MODES[mode], seed=3)
    assert hc.prefill.runs >= 1
    ids = prompt(model, 40, seed=9)
    hc.generate(ids, max_new_tokens=3, do_sample=False)  # saves through the static path
    assert hc.restore(torch.cat([ids, prompt(model, 3)], dim=1)).tokens == 40 // C * C


def test_static_prefill_leaves_earlier_caches_intact(store):
    """Each run writes the bucket's static memory again: a cache from an earlier run still reads its own K/V."""
    model = build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C, captured_prefill=True)
    first = prompt(model, 30, seed=1)
    second = prompt(model, 30, seed=2)
    for ids in (first, second):
        hc.generate(ids, max_new_tokens=2, do_sample=False)
    out1 = hc.generate(first, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    keep = [l.keys.clone() for l in out1.past_key_values.layers] if hasattr(out1, "past_key_values") else None
    cache1 = getattr(out1, "past_key_values", None) or getattr(out1, "cache")
    hc.generate(second, max_new_tokens=2, do_sample=False)  # reuses the bucket
    ref = new_cache(model)
    with torch.no_grad():
        model(out1.sequences[:, :-1], use_cache=True, **{cache_kwarg(model): ref})
    for mine, theirs in zip(cache1.layers, ref.layers):
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-5)
    assert keep is None or all(torch.equal(k, l.keys) for k, l in zip(keep, cache1.layers))


@pytest.mark.parametrize("method", ["hcache", "kv"])
def test_restore_into_the_static_cache_gives_the_models_tokens(method, store):
    """Once a bucket exists, a restore writes each layer's K/V straight into its static cache (nothing is
    copied in before the forward); prompts of other lengths in the same bucket and a growing chat give
    model.generate's tokens, and a cache from an earlier call keeps its own K/V."""
    model = build("llama_mha")
    attention = getattr(model.config, "_attn_implementation")
    hc = HCache(model, store, method=method, chunk_tokens=C, captured_prefill=True)
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    ids = prompt(model, 37, seed=4)
    for extra in (0, 0, 2, 5):  # the same prefix, suffixes of 5..10 tokens: one suffix bucket
        req = torch.cat([ids, prompt(model, extra, seed=extra)], dim=1)
        assert torch.equal(hc.generate(req, **gen), model.generate(req, **gen)), extra
    assert hc.prefill.in_place > 0
    assert getattr(model.config, "_attn_implementation") == attention  # the static forward's eager attention is undone
    held = hc.generate(ids, **gen, return_dict_in_generate=True)
    other = prompt(model, 37, seed=5)
    hc.generate(other, **gen)
    hc.generate(other, **gen)  # restored into the bucket the held cache came from
    assert_holds_models_state(model, held.past_key_values, held.sequences[:, :-1], atol=1e-5)


def test_prompt_with_padding_is_neither_restored_nor_saved(store):
    """generate() masks pad tokens it finds in a prompt: such a prefix's state depends on the mask, so
    HCache leaves the call to the model."""
    model = build_model("llama_mha")  # pad 0 != eos 2
    hc = HCache(model, store, chunk_tokens=C)
    ids = prompt(model, 30)
    hc.generate(ids, max_new_tokens=2, do_sample=False)
    padded = ids.clone()
    padded[0, 5] = model.generation_config.pad_token_id
    gen = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(hc.generate(padded, **gen), model.generate(padded, **gen))
    mask = torch.ones_like(ids)
    mask[0, 3] = 0
    assert torch.equal(hc.generate(ids, attention_mask=mask, **gen), model.generate(ids, attention_mask=mask, **gen))


@pytest.mark.parametrize("hold", [True, False])
def test_the_flusher_is_held_back_until_the_first_forward_returns(hold, store):
    """hc.generate holds the store's flusher from its restore until generate()'s first forward returns, and
    always lets go (after the call, and when the call fails)."""
    model = build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C, hold_flusher=hold)
    ids = prompt(model, 30, seed=6)
    hc.generate(ids, max_new_tokens=2, do_sample=False)
    seen = []
    handle = model.register_forward_pre_hook(lambda *a: seen.append(store.background_held))
    try:
        hc.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert seen == ([1, 0, 0] if hold else [0, 0, 0])
    assert store.background_held == 0
    seen.clear()
    batch = torch.cat([ids, prompt(model, 30, seed=7)])  # a prefix per row (serving's batched generate)
    handle = model.register_forward_pre_hook(lambda *a: seen.append(store.background_held))
    try:
        hc.generate(batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    assert seen[0] == int(hold) and seen[1:] == [0] * (len(seen) - 1)
    assert store.background_held == 0
    with pytest.raises(ValueError):
        hc.generate(ids, max_new_tokens=2, do_sample=False, num_beams=2, num_return_sequences=3)
    assert store.background_held == 0

"""The generic projection (the model's own modules up to its cache write) and `support()`'s verdicts.

Tiny random models in float32 on the CPU: the hand-written fast paths against
the generic projection bit for bit, the generic projection against the model's
own cache for the kinds of attention the fast paths do not cover, and what
`support()` says for models that cannot be served by hidden-state restore.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from hcache_adapter.compat import cache_kwarg, new_cache
from hcache_adapter.projection import (
    GenericProjector,
    NoKVCache,
    Projector,
    fast_projector_for,
    generic_projector_for,
    projector_for,
    support,
)
from hcache_adapter.projection.capture import state_difference
from tests.helpers.models import BATCH, CASES, SEQ, VOCAB, build, tiny_causal_lm

EXACT = 1e-6  # the generic projection runs the model's own code on the same input: equal up to kernel choice


@torch.no_grad()
def prefill(model, layers, ids):
    """(the model's cache, each decoder layer's input hidden state) of one prefill."""
    hidden = {}
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: hidden.__setitem__(i, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
        for i, layer in enumerate(layers)]
    try:
        cache = new_cache(model)
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
    finally:
        for h in handles:
            h.remove()
    return cache, hidden


def ids_of(model, n=SEQ, batch=1, seed=1):
    vocab = model.config.get_text_config(decoder=True).vocab_size
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_path_equals_the_generic_projection_bit_for_bit(name):
    model = build(name)
    fast, generic = fast_projector_for(model), generic_projector_for(model)
    assert isinstance(generic, GenericProjector) and not isinstance(fast, GenericProjector)
    ids = ids_of(model, batch=BATCH)
    _, hidden = prefill(model, generic.decoder_layers, ids)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    for layer in range(generic.num_layers):
        pair = fast.project(layer, hidden[layer], positions), generic.project(layer, hidden[layer], positions)
        for a, b in zip(*pair):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b), (name, layer, (a - b).abs().max().item())


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "falcon_new_arch_2ln", "phi3_partial_rotary"])
def test_support_uses_the_fast_path_where_it_reproduces_the_cache(name):
    s = support(build(name))
    assert s.kind == "hidden" and s.fast_path and type(s.projector) is type(fast_projector_for(build(name)))


# Kinds of attention the generic projection serves with no code of its own: each compared with the model's cache.
GENERIC_FAMILIES = {
    "gemma3_text": "sliding windows with a per-layer-type rotary and q/k norms",
    "deepseek_v3": "latent attention: the cache holds a compressed latent and a rotary key of other widths",
    "bloom": "ALiBi (nothing positional in K)",
    "phi": "partial rotary, fused dense layout",
    "olmo2": "q/k norms over all heads at once (no one-head query)",
    "opt": "learned absolute positions (inside the hidden state)",
    "bert": "an encoder used as a decoder",
    "qwen3_next": "linear-attention layers (conv + recurrent state) beside full attention",
    "nemotron_h": "mamba, MLP-only and attention layers",
}


@pytest.mark.parametrize("family", sorted(GENERIC_FAMILIES))
def test_generic_projection_rebuilds_every_layer_as_the_prefill_left_it(family):
    model = tiny_causal_lm(family)
    s = support(model)
    assert s.kind == "hidden", s.reason
    proj = s.projector
    ids = ids_of(model, n=20)  # longer than the tiny sliding windows (12)
    cache, hidden = prefill(model, proj.decoder_layers, ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    restored = new_cache(model)
    for layer in range(proj.num_layers):
        proj.fill_prefix(restored, layer, hidden[layer], positions)
    for layer, (got, want) in enumerate(zip(restored.layers, cache.layers)):
        diff, where = state_difference(got, want)
        assert diff <= EXACT, (family, layer, where, diff)


def test_positions_not_starting_at_zero_are_the_model_s_own():
    model = tiny_causal_lm("llama")
    proj = generic_projector_for(model)
    ids = ids_of(model, n=12)
    cache, hidden = prefill(model, proj.decoder_layers, ids)
    positions = torch.arange(5, 12).unsqueeze(0)
    for layer in range(proj.num_layers):
        k, v = proj.project(layer, hidden[layer][:, 5:], positions)
        assert (k - cache.layers[layer].keys[:, :, 5:]).abs().max() <= EXACT
        assert (v - cache.layers[layer].values[:, :, 5:]).abs().max() <= EXACT


def test_batch_rows_project_as_each_row_alone():
    model = tiny_causal_lm("gemma3_text")
    proj = generic_projector_for(model)
    ids = ids_of(model, batch=2)
    _, hidden = prefill(model, proj.decoder_layers, ids)
    k, v = proj.project(1, hidden[1])
    for row in range(2):
        k1, v1 = proj.project(1, hidden[1][row : row + 1])
        assert torch.allclose(k[row : row + 1], k1, atol=EXACT) and torch.allclose(v[row : row + 1], v1, atol=EXACT)


def test_query_is_cut_to_one_head_where_that_leaves_k_and_v_unchanged():
    model = build("llama_mha")
    proj = generic_projector_for(model)
    assert all(plan.query is not None for plan in proj.plans)
    hidden = torch.randn(BATCH, SEQ, model.config.hidden_size)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    proj.project(0, hidden, positions)  # records the layers' calls: not part of a layer's cost
    with FlopCounterMode(display=False) as counter:
        proj.project(0, hidden, positions)
    hd, d = proj.head_dim(0), model.config.hidden_size
    kv = 2 * BATCH * SEQ * d * 2 * proj.num_kv_heads(0) * hd
    assert kv <= counter.get_total_flops() <= kv + 2 * BATCH * SEQ * d * hd + 10_000  # + one query head, rotary
    with torch.no_grad():  # query heads other than the first are never read
        for layer in proj.decoder_layers:
            layer.self_attn.q_proj.weight[hd:] = float("nan")
    clean = build("llama_mha")
    cache, hidden = prefill(clean, list(clean.model.layers), ids_of(model))
    k, v = proj.project(0, hidden[0])
    assert (k - cache.layers[0].keys).abs().max() <= EXACT and (v - cache.layers[0].values).abs().max() <= EXACT


def test_query_stays_whole_where_its_norm_spans_every_head():
    proj = generic_projector_for(tiny_causal_lm("olmo2"))
    assert all(plan.query is None for plan in proj.plans)


def test_the_layer_calls_are_recorded_once_per_restore():
    model = tiny_causal_lm("gemma3_text")
    proj = generic_projector_for(model)
    forwards = []
    handle = model.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        hidden = torch.randn(1, 10, model.config.hidden_size)
        positions = torch.arange(10).unsqueeze(0)
        for layer in range(proj.num_layers):
            proj.project(layer, hidden, positions)
        assert len(forwards) == 1
        proj.project(0, hidden, torch.arange(10).unsqueeze(0))  # another positions tensor: recorded again
        assert len(forwards) == 2
    finally:
        handle.remove()


def test_recording_the_layer_calls_puts_back_a_forward_the_layers_had_of_their_own():
    """An accelerate hook or HCache's saver replaces an instance's `forward`; recording the calls must not
    drop it (it used to delete the attribute, and with it a saver's wrapper in the middle of generate)."""
    model = tiny_causal_lm("gemma3_text")
    proj = generic_projector_for(model)
    layer = model.model.layers[0]
    calls = []
    inner = layer.forward

    def own(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    layer.forward = own
    hidden = torch.randn(1, 10, model.config.hidden_size)
    proj.project(0, hidden, torch.arange(10).unsqueeze(0))
    assert layer.__dict__.get("forward") is own
    assert "forward" not in model.model.layers[1].__dict__  # the others have none of their own again
    before = len(calls)
    with torch.no_grad():
        model(ids_of(model))
    assert len(calls) == before + 1  # the model's own forward still goes through it


def test_layers_without_k_v_raise_and_their_state_is_the_model_s():
    model = tiny_causal_lm("qwen3_next")
    s = support(model)
    proj = s.projector
    assert [ls.kind for ls in s.layers] == ["recurrent", "recurrent", "recurrent", "full"]
    cache, hidden = prefill(model, proj.decoder_layers, ids_of(model))
    with pytest.raises(NoKVCache):
        proj.project(0, hidden[0])
    states = proj.project_state(0, hidden[0])
    assert list(states) == [0]
    assert type(states[0]) is type(cache.layers[0]) and state_difference(states[0], cache.layers[0])[0] <= EXACT


def test_layers_without_a_cache_of_their_own_have_nothing_to_restore():
    model = tiny_causal_lm("nemotron_h")
    s = support(model)
    shared = [i for i, ls in enumerate(s.layers) if ls.kind == "shared"]
    assert shared
    cache = new_cache(model)
    before = [type(layer) for layer in cache.layers]
    for i in shared:
        assert s.projector.project_state(i, torch.randn(1, 4, model.config.hidden_size)) == {}
        s.projector.fill_prefix(cache, i, torch.randn(1, 4, model.config.hidden_size), torch.arange(4)[None])
    assert [type(layer) for layer in cache.layers] == before


def test_sliding_window_layers_report_their_window():
    s = support(tiny_causal_lm("gemma3_text"))
    assert [(ls.kind, ls.window) for ls in s.layers] == [("sliding", 12)] * 3 + [("full", None)]
    assert not any(ls.plain_kv for ls in s.layers[:3]) and s.layers[3].plain_kv


@pytest.mark.parametrize("family, kind, why", [
    ("minimax", "refused", "cache of its own"),
    ("openai-gpt", "recompute", "keeps no cache"),
    ("recurrent_gemma", "recompute", "keeps state outside its cache"),
    ("gemma3n_text", "recompute", "not one [batch, tokens, ...] tensor"),  # AltUp: [streams, batch, tokens, D]
    ("xlm", "recompute", "cannot continue from a filled cache"),
    ("hrm_text", "recompute", "looped model"),
])
def test_support_refuses_up_front_with_one_reason(family, kind, why):
    s = support(tiny_causal_lm(family))
    assert s.kind == kind and why in s.reason and s.projector is None


# Before transformers 5.25 a cache of recurrent layers only (Mamba) reports no length: generate() is then given
# only the tokens after it; from 5.25 its layers count their tokens and generate() is given all of them.
RECURRENT_CACHE_HAS_NO_LENGTH = Version(transformers.__version__) < Version("5.25")


@pytest.mark.parametrize("family, mode, new_only", [("llama", "chunk", False), ("jamba", "step", False),
                                                   ("mamba", "step", RECURRENT_CACHE_HAS_NO_LENGTH)])
def test_support_says_how_generate_continues_a_restored_cache(family, mode, new_only):
    s = support(tiny_causal_lm(family))
    assert s.kind == "hidden" and s.continuation == mode and s.new_tokens_only == new_only


def test_a_layer_owning_two_cache_layers_fills_both():
    model = tiny_causal_lm("longcat_flash")  # two attention sublayers per decoder block
    s = support(model)
    assert s.kind == "hidden" and [ls.slots for ls in s.layers] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    cache, hidden = prefill(model, s.projector.decoder_layers, ids_of(model))
    restored = new_cache(model)
    for layer in range(s.projector.num_layers):
        s.projector.fill_prefix(restored, layer, hidden[layer], torch.arange(SEQ)[None])
    assert max(state_difference(a, b)[0] for a, b in zip(restored.layers, cache.layers)) <= EXACT


def test_a_bidirectional_model_is_not_a_prefix_cache():
    model = tiny_causal_lm("bert")
    for layer in model.bert.encoder.layer:
        layer.attention.self.is_causal = False
    s = support(model)
    assert s.kind == "recompute" and "not causal" in s.reason


def test_not_a_decoder_only_transformers_model_is_refused():
    from transformers import BartConfig, BartForConditionalGeneration

    assert support(torch.nn.Linear(2, 2)).kind == "refused"
    bart = BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=16, decoder_ffn_dim=16))
    assert support(bart).kind == "refused" and "encoder-decoder" in support(bart).reason
    assert projector_for(bart) is None


def test_support_leaves_the_model_as_it_was():
    model = tiny_causal_lm("gemma3_text")
    model.train()
    ids = ids_of(model)
    before = model.eval().generate(ids, max_new_tokens=4, do_sample=False)
    model.train()
    s = support(model)
    assert model.training  # restored
    model.eval()
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), before)
    for layer in s.decoder_layers:
        assert "forward" not in vars(layer)  # the recording stubs are gone
    assert isinstance(s.projector, Projector)


def test_projection_after_support_is_exact_for_a_cache_built_empty():
    """`fill_prefix` works into any empty cache of the model's layout, e.g. a fresh DynamicCache(config)."""
    model = tiny_causal_lm("cohere2")
    proj = projector_for(model)
    cache, hidden = prefill(model, proj.decoder_layers, ids_of(model, n=16))
    restored = DynamicCache(config=model.config)
    for layer in range(proj.num_layers):
        proj.fill_prefix(restored, layer, hidden[layer], torch.arange(16)[None])
    assert max(state_difference(a, b)[0] for a, b in zip(restored.layers, cache.layers)) <= EXACT

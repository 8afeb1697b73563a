"""Tiny random models, one per architecture the projection tests cover (shared by the hcache tests).

`CASES` maps a case name to how to build it and what its cache looks like;
`build(name)` makes the model with perturbed norms and biases so that a wrong
norm or a missing bias shows in a 1e-5 comparison.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ATOL = 1e-5
BATCH, SEQ, VOCAB = 2, 7, 128
D, HEADS, LAYERS = 64, 4, 2
HD = D // HEADS
SMALL = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
SMALL_LLAMA = dict(SMALL, intermediate_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2)


QueryRows = Callable[[torch.nn.Module], tuple[torch.nn.Parameter, object]]


@dataclass(frozen=True)
class Case:
    build: Callable[[], torch.nn.Module]
    kv_groups: int  # KV heads the K/V GEMM computes (before any repeat transformers does)
    cache_heads: int  # heads per layer in the model's cache
    query_rows: QueryRows | None  # decoder layer -> (weight, its query rows), known independently of the code


def _q_proj(layer):
    return layer.self_attn.q_proj.weight, slice(None)


def _fused(attr: str, query_rows: Callable[[torch.Tensor], torch.Tensor]) -> QueryRows:
    """Query rows of a fused projection `layer.<attr>`; query_rows maps arange(rows) to them."""

    def query(layer):
        module = layer
        for name in attr.split("."):
            module = getattr(module, name)
        return module.weight, query_rows(torch.arange(module.weight.shape[0]))

    return query


def _q_first(r):  # [Q | K | V] blocks (Phi-3, Falcon multi-query)
    return r[:D]


def _q_per_head(r):  # [H, 3, hd] interleaved (GPT-NeoX, classic Falcon)
    return r.view(HEADS, 3, HD)[:, 0]


def _q_per_group(kv):  # [kv, H/kv + 2, hd] (Falcon new decoder architecture)
    return lambda r: r.view(kv, HEADS // kv + 2, HD)[:, :-2]


def _llama_like(model_cls, config_cls, kv, **kw):
    return Case(lambda: model_cls(config_cls(**SMALL_LLAMA, num_key_value_heads=kv, **kw)), kv, kv, _q_proj)


def _opt(pre_ln: bool):
    config = dict(SMALL, ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=D, pad_token_id=1)
    return Case(lambda: OPTForCausalLM(OPTConfig(**config, do_layer_norm_before=pre_ln)), HEADS, HEADS, _q_proj)


def _neox(**kw):
    config = dict(SMALL, intermediate_size=128, max_position_embeddings=64, **kw)
    return Case(lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**config)), HEADS, HEADS,
                _fused("attention.query_key_value", _q_per_head))


def _falcon(kv_groups, cache_heads, query_rows, **kw):
    config = dict(SMALL, bos_token_id=1, eos_token_id=2, **kw)
    return Case(lambda: FalconForCausalLM(FalconConfig(**config)), kv_groups, cache_heads,
                _fused("self_attention.query_key_value", query_rows))


CASES: dict[str, Case] = {
    "llama_mha": _llama_like(LlamaForCausalLM, LlamaConfig, kv=HEADS),
    "llama_gqa": _llama_like(LlamaForCausalLM, LlamaConfig, kv=2),
    "llama_mqa_bias": _llama_like(LlamaForCausalLM, LlamaConfig, kv=1, attention_bias=True),
    "mistral_gqa": _llama_like(MistralForCausalLM, MistralConfig, kv=2),
    "qwen2_gqa_bias": _llama_like(Qwen2ForCausalLM, Qwen2Config, kv=2),
    "qwen3_gqa_knorm": _llama_like(Qwen3ForCausalLM, Qwen3Config, kv=2, head_dim=HD),
    "gemma_mqa": _llama_like(GemmaForCausalLM, GemmaConfig, kv=1, head_dim=HD),
    "phi3_gqa": Case(lambda: Phi3ForCausalLM(Phi3Config(**SMALL_LLAMA, num_key_value_heads=2)), 2, 2,
                     _fused("self_attn.qkv_proj", _q_first)),
    "phi3_partial_rotary": Case(
        lambda: Phi3ForCausalLM(Phi3Config(**SMALL_LLAMA, num_key_value_heads=2, partial_rotary_factor=0.5)),
        2, 2, _fused("self_attn.qkv_proj", _q_first)),
    "gpt2": Case(lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                                    n_positions=64, bos_token_id=1, eos_token_id=2)),
                 HEADS, HEADS, lambda layer: (layer.attn.c_attn.weight, (slice(None), slice(0, D)))),
    "opt_pre_ln": _opt(pre_ln=True),
    "opt_post_ln": _opt(pre_ln=False),
    "gpt_neox_partial_rotary": _neox(rotary_pct=0.25),
    "gpt_neox_full_rotary_seq_residual": _neox(rotary_pct=1.0, use_parallel_residual=False),
    "falcon_multi_query_rotary": _falcon(1, 1, _q_first, multi_query=True),
    "falcon_mha_rotary": _falcon(HEADS, HEADS, _q_per_head, multi_query=False, parallel_attn=False),
    "falcon_mha_alibi_bias": _falcon(HEADS, HEADS, _q_per_head, multi_query=False, alibi=True, bias=True),
    "falcon_new_arch_2ln": _falcon(2, HEADS, _q_per_group(2), new_decoder_architecture=True, num_kv_heads=2),
    "falcon_new_arch_1ln_mqa": _falcon(1, HEADS, _q_per_group(1), new_decoder_architecture=True, num_kv_heads=1,
                                       num_ln_in_parallel_attn=1),
}


def build(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CASES[name].build().to(dtype).eval()
    with torch.no_grad():  # perturb norms and biases so a wrong norm or a missing bias shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(5.0)  # default init (std 0.02) makes K, V tiny; make the 1e-5 bound meaningful
    return model



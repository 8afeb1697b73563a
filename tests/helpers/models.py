"""Tiny random models, one per architecture the projection tests cover (shared by the hcache tests).

`CASES` maps a case name to how to build it and what its cache looks like;
`build(name)` makes the model with perturbed norms and biases so that a wrong
norm or a missing bias shows in a 1e-5 comparison.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
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


# transformers before 5.25 broadcast a new-architecture Falcon's K/V to every query head before caching;
# from 5.25 its cache holds the KV groups (attention repeats them, as Llama's does).
FALCON_NEW_ARCH_CACHE_BROADCAST = Version(transformers.__version__) < Version("5.25")


def _new_arch_cache_heads(kv_groups: int) -> int:
    return HEADS if FALCON_NEW_ARCH_CACHE_BROADCAST else kv_groups


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
    "falcon_new_arch_2ln": _falcon(2, _new_arch_cache_heads(2), _q_per_group(2), new_decoder_architecture=True, num_kv_heads=2),
    "falcon_new_arch_1ln_mqa": _falcon(1, _new_arch_cache_heads(1), _q_per_group(1), new_decoder_architecture=True, num_kv_heads=1,
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




# ---------------------------------------------------------------------------------------------------------------
# Every causal-LM family of transformers, tiny: what tests/hcache/test_architectures.py sweeps.
#
# `tiny_config(model_type)` starts from the family's default config and shrinks every size it knows by name
# (widths, layer and head counts, experts, vocab), keeps one layer of each layer type (sliding / full / linear
# attention, ...) in 4 layers, and applies the few per-family fixes in TINY_OVERRIDES that a generic shrink
# cannot guess (consistency rules between fields).  Families that cannot be run from a tiny text-only config
# are in NOT_BUILDABLE with the reason.

TINY_LAYERS = 4
TINY_MAX_PARAMETERS = 100_000_000  # a few families keep per-layer sub-configs the shrink does not reach
TINY_SIZES = dict(
    vocab_size=VOCAB, hidden_size=D, n_embd=D, d_model=D, emb_dim=D, dim_model=D, embedding_dim=D,
    num_hidden_layers=TINY_LAYERS, n_layer=TINY_LAYERS, num_layers=TINY_LAYERS, n_layers=TINY_LAYERS,
    decoder_layers=TINY_LAYERS, encoder_layers=TINY_LAYERS, num_blocks=TINY_LAYERS,
    num_attention_heads=HEADS, n_head=HEADS, n_heads=HEADS, num_heads=HEADS, decoder_attention_heads=HEADS,
    encoder_attention_heads=HEADS, num_key_value_heads=2, num_kv_heads=2, n_kv_heads=2,
    intermediate_size=128, ffn_dim=128, n_inner=128, ffn_hidden_size=128, d_ff=128, dff=128, dim_ff=128,
    decoder_ffn_dim=128, encoder_ffn_dim=128,
    max_position_embeddings=256, n_positions=256, n_ctx=256, max_seq_len=256, max_target_positions=256,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, shared_experts_intermediate_size=32,
    expert_ffn_hidden_size=32, n_shared_experts=1,
    n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=16, qk_head_dim=16, rotary_dim=8, first_k_dense_replace=1, index_head_dim=16, index_n_heads=2,
    state_size=16, ssm_state_size=16, mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16, mamba_chunk_size=16,
    mamba_dt_rank=8, time_step_rank=8, chunk_size=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_head_dim=16, linear_num_heads=4,
    vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, laurel_rank=8,
    swa_num_attention_heads=HEADS, swa_num_key_value_heads=2, swa_head_dim=HD, unpadded_vocab_size=VOCAB,
    pronunciation_vocab_size=32, shape_vocab_size=32, pronunciation_embed_dim=16, shape_embed_dim=16,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
TINY_WINDOWS = dict(sliding_window=12, attention_chunk_size=12, sliding_window_size=12, window_size=12,
                    attention_window_size=12)  # only where the default has a window
# Families whose tiny config needs more than the generic shrink (field consistency rules, layer patterns).
TINY_OVERRIDES: dict[str, dict] = {
    "bamba": dict(attn_layer_indices=[1, 3]),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=128, hidden_size=D, moe_num_experts=4, moe_top_k=2)),
    "dory": dict(sliding_window=64),  # transformers' Dory fails on sequences longer than its window
    "dots3_note_text": dict(num_key_value_heads=HEADS),
    "ernie4_5_moe": dict(moe_k=2, moe_num_shared_experts=1, moe_layer_end_index=TINY_LAYERS - 1),
    "falcon_h1": dict(mamba_d_ssm=2 * D),
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                         intermediate_size=[128] * TINY_LAYERS, activation_sparsity_pattern=[0.0] * TINY_LAYERS),
    "gpt_neo": dict(attention_types=[[["global", "local"], TINY_LAYERS // 2]]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"] * 2, shared_intermediate_size=32),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  use_mamba_kernels=False),
    "lfm2": dict(layer_types=["conv", "full_attention"] * 2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2, num_dense_layers=1),
    "mamba2": dict(num_heads=8, head_dim=HD, n_groups=1),
    "reformer": dict(is_decoder=True, attn_layers=["local"] * TINY_LAYERS, attention_head_size=HD,
                     axial_pos_shape=(16, 16), axial_pos_embds_dim=(16, 48), feed_forward_size=128,
                     local_attn_chunk_length=16, lsh_attn_chunk_length=16),
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=16),
    "zamba": dict(attn_layer_period=2, attn_layer_offset=1, attention_hidden_size=2 * D, attention_head_dim=HD,
                  n_mamba_heads=2),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"] * 2, n_mamba_heads=2, adapter_rank=8),
}
NOT_BUILDABLE: dict[str, str] = {
    "blt": "byte-level model of four sub-models (patcher, local encoder/decoder, global) with hash embeddings",
    "prophetnet": "encoder-decoder: its n-gram decoder needs the encoder's layers configured with it",
    "xlnet": "permutation language model: its memory is not a cache of past positions",
    "gemma4_assistant": "a speculative-decoding draft model; its nested Gemma 4 text config does not shrink",
    "fuyu": "multimodal: image patches are projected into the decoder's input (its default sizes do not shrink)",
    "musicgen": "audio model: text encoder, audio-code decoder and audio tokenizer",
    "musicgen_melody": "audio model: text encoder, audio-code decoder and audio tokenizer",
}
# Configs with a vision / audio sub-config whose causal LM is the text model alone.
TEXT_ONLY = {"moshi"}
_VISION_AUDIO = ("vision", "audio", "speech", "image", "visual", "vq", "mm_", "perceiver")


class NotBuildable(Exception):
    """A family the sweep cannot build from a tiny text-only config; the message says why."""


def _config_fields(cls, default) -> set[str]:
    """The settable fields of a config class (dataclass fields in transformers >= 5.2x, else its to_dict keys)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(default.to_dict())
    return names - {n for n in dir(cls) if isinstance(getattr(cls, n, None), property)}


def _pick_layers(types: list[str], n: int) -> list[int]:
    """n layer indices, in order, that cover every distinct layer type of `types` (earliest first)."""
    chosen = sorted({types.index(t) for t in dict.fromkeys(types)})[:n]
    for i in range(len(types)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen = sorted(chosen + [i])
    return chosen


def _field(config, name: str):
    """A config field's default, or None where reading it is refused (per-layer attributes of heterogeneous configs)."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def multimodal_reason(config) -> str | None:
    """Why a config is not a text-only decoder (a vision / audio tower), or None."""
    subs = getattr(config, "sub_configs", None) or {}
    towers = [k for k in subs if any(w in k.lower() for w in _VISION_AUDIO)]
    return f"multimodal: needs its {', '.join(sorted(towers))}" if towers else None


def tiny_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in NOT_BUILDABLE:
        raise NotBuildable(NOT_BUILDABLE[model_type])
    cls = CONFIG_MAPPING[model_type]
    try:
        default = cls()
    except Exception:  # a few defaults are invalid on their own
        default = cls(**TINY_OVERRIDES.get(model_type, {}))
    fields = _config_fields(cls, default)
    why = multimodal_reason(default) if model_type not in TEXT_ONLY else None
    if why:
        raise NotBuildable(why)
    kw = {k: v for k, v in TINY_SIZES.items() if k in fields}
    if "head_dim" in fields:
        kw["head_dim"] = TINY_SIZES["qk_rope_head_dim"] if "qk_rope_head_dim" in fields else HD
    if "kv_lora_rank" in fields and "num_key_value_heads" in fields:
        kw["num_key_value_heads"] = HEADS  # latent attention: every head reads the one latent
    for name in fields:  # sizes the table does not name: any other large width, rank or vocabulary
        value = _field(default, name)
        if name in kw or not isinstance(value, int) or isinstance(value, bool) or value <= 64:
            continue
        if "vocab" in name:
            kw[name] = VOCAB
        elif name.endswith(("_rank", "head_dim", "dim_head")):
            kw[name] = HD
    for name, value in TINY_WINDOWS.items():
        if name in fields and _field(default, name) is not None:
            kw[name] = value
    n_default = _field(default, "num_hidden_layers")
    types = _field(default, "layer_types") if "layer_types" in fields else None
    if n_default and types is not None and len(types) == n_default:
        keep = _pick_layers(list(types), TINY_LAYERS)
        for name in fields:  # every per-layer list follows the same layers
            value = _field(default, name)
            if isinstance(value, (list, tuple)) and len(value) == n_default and name not in kw:
                kw[name] = [value[i] for i in keep]
    if "is_decoder" in fields:
        kw["is_decoder"] = True  # encoder families used as decoders (BERT & co.): causal, with a cache
    kw.update(TINY_OVERRIDES.get(model_type, {}))
    return cls(**kw)


def tiny_causal_lm(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The family's *ForCausalLM with random weights, tiny (raises NotBuildable with the reason)."""
    import warnings

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = tiny_config(model_type)
        except NotBuildable:
            raise
        except Exception as e:
            raise NotBuildable(f"no tiny config ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        if model_cls.__name__.endswith("ForConditionalGeneration"):
            raise NotBuildable(f"{model_cls.__name__}: a multimodal model")
        try:
            with torch.device("meta"):  # count first: a config the shrink missed must not take the machine down
                size = sum(p.numel() for p in model_cls(config).parameters())
        except Exception as e:
            raise NotBuildable(f"cannot build ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
        if size > TINY_MAX_PARAMETERS:
            raise NotBuildable(f"its tiny config still has {size / 1e6:.0f}M parameters")
        torch.manual_seed(seed)
        try:
            model = model_cls(config)
        except Exception as e:
            raise NotBuildable(f"cannot build ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
    if hasattr(model, "set_default_language") and getattr(config, "languages", None):
        model.set_default_language(config.languages[0])  # X-MOD: one adapter per language
    pad = getattr(config, "pad_token_id", None)
    model.generation_config.pad_token_id = pad if pad is not None else 0
    return model.to(dtype).eval()


def causal_lm_types() -> list[str]:
    """Every model type of transformers' causal-LM auto mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

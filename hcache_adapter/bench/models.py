"""Model shapes the demo and the benchmarks build with random weights (nothing is downloaded).

The 7B/8B shapes are Llama-2-7B (multi-head: 32 K/V heads) and Llama-3-8B
(grouped-query: 8 K/V heads); Llama-2-13B (multi-head, 40 layers x 5120) is
the tensor-parallel benchmark's; the small ones make CPU runs take seconds.
"""
from __future__ import annotations

import torch

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       intermediate_size=13824, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    "base": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048, vocab_size=32000),
    "small": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1408, vocab_size=32000),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512, vocab_size=1000),
    "tiny-gqa": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=512, vocab_size=1000),
}


def build_model(name: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                layers: int | None = None, max_positions: int = 8192, seed: int = 0):
    """A Llama-architecture causal LM of shape `name`, random weights, in eval mode, built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
    spec = dict(SHAPES[name])
    if layers:
        spec["num_hidden_layers"] = layers
    config = LlamaConfig(**spec, max_position_embeddings=max_positions)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # pad = eos: generate() never infers a padding mask from token ids that happen to be the pad id
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def shape_label(model) -> str:
    cfg = model.config
    return (f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}, {cfg.num_attention_heads} heads "
            f"({cfg.num_key_value_heads} K/V), {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")


def add_request_arguments(parser) -> None:
    """The options of the one-request GPU benchmarks (benchmarks/*.py): model shape, stored context,
    new tokens, and a layer-count override for quick runs."""
    parser.add_argument("--model", default="llama2-7b", help=f"shape, from {sorted(SHAPES)}")
    parser.add_argument("--context", type=int, default=4096, help="stored prefix tokens")
    parser.add_argument("--suffix", type=int, default=32, help="new tokens in the request")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")

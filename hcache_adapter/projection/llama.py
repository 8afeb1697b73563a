"""Llama-style decoders: Llama, Mistral, Qwen2, Gemma (and Qwen3 in ``qwen3.py``).

Layer ``i`` is ``base.layers[i]``; its attention is ``.self_attn`` with separate
``k_proj``/``v_proj`` Linears (bias for Qwen2), after the pre-attention norm
``.input_layernorm`` (Gemma's ``1 + weight`` RMSNorm included: we call the
module).  GQA/MQA: ``k_proj`` has ``num_key_value_heads * head_dim`` outputs.
Rotary: one module for the model, ``base.rotary_emb(h, position_ids) -> cos, sin``,
applied with the modeling module's ``rotate_half``.  Gemma's embedding scale
(``sqrt(D)``) is applied before layer 0, so it is already inside h.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import KV, Projector, modeling_function, rotary_cos_sin, rotate_key
from .registry import register


@register("llama", "mistral", "qwen2", "gemma")
class LlamaProjector(Projector):
    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.base_model.layers)

    def num_kv_heads(self, layer: int = 0) -> int:
        return int(self.config.num_key_value_heads)

    def head_dim(self, layer: int = 0) -> int:
        return int(self.decoder_layers[layer].self_attn.head_dim)

    def _key_heads(self, attn: nn.Module, key: Tensor) -> Tensor:
        """Hook on K as ``[B, T, kv_heads, head_dim]``, before the transpose and rotary."""
        return key

    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        block = self.decoder_layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        heads_shape = (*x.shape[:-1], -1, attn.head_dim)
        key = self._key_heads(attn, attn.k_proj(x).view(heads_shape)).transpose(1, 2)
        value = attn.v_proj(x).view(heads_shape).transpose(1, 2)
        cos, sin = rotary_cos_sin(self.base_model.rotary_emb, hidden, position_ids)
        return rotate_key(key, cos, sin, modeling_function(attn, "rotate_half")), value

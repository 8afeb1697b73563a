"""Phi-3: one fused ``self_attn.qkv_proj`` Linear laid out ``[Q (H*hd) | K (kv*hd) | V (kv*hd)]``.

The K|V rows are one contiguous block of the weight, so only that block runs
(a view, no copy).  Rotary from ``base.rotary_emb``; with
``partial_rotary_factor < 1`` its cos/sin are narrower than head_dim and only the
leading features rotate (``rotate_key`` follows Phi-3's ``apply_rotary_pos_emb``).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import KV, Projector, modeling_function, rotary_cos_sin, rotate_key, split_heads
from .registry import register


@register("phi3")
class Phi3Projector(Projector):
    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.base_model.layers)

    def num_kv_heads(self, layer: int = 0) -> int:
        return int(self.decoder_layers[layer].self_attn.num_key_value_heads)

    def head_dim(self, layer: int = 0) -> int:
        return int(self.decoder_layers[layer].self_attn.head_dim)

    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        block = self.decoder_layers[layer]
        attn = block.self_attn
        q_size = self.config.num_attention_heads * attn.head_dim
        kv_size = attn.num_key_value_heads * attn.head_dim
        fused = self.fused_kv(layer, attn.qkv_proj, lambda: slice(q_size, q_size + 2 * kv_size))
        key, value = (split_heads(t, attn.head_dim) for t in fused(block.input_layernorm(hidden)).chunk(2, -1))
        cos, sin = rotary_cos_sin(self.base_model.rotary_emb, hidden, position_ids)
        return rotate_key(key, cos, sin, modeling_function(attn, "rotate_half")), value

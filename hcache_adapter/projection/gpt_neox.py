"""GPT-NeoX (Pythia): fused ``attention.query_key_value`` interleaved per head.

The fused output is ``[H, 3, head_size]`` (q, k, v of head 0, then head 1, ...),
so the K and V rows are gathered once into a contiguous ``[2 * H * hd, D]``
weight and only that GEMM runs.  Pre-norm ``input_layernorm`` (for both the
parallel and the sequential residual).  Partial rotary (``rotary_pct``, stored as
``rope_parameters["partial_rotary_factor"]``): ``base.rotary_emb`` yields cos/sin
of width ``rotary_ndims`` and the rest of each head passes through.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import KV, Projector, grouped_rows, modeling_function, rotary_cos_sin, rotate_key, split_heads
from .registry import register


@register("gpt_neox")
class GPTNeoXProjector(Projector):
    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.base_model.layers)

    def num_kv_heads(self, layer: int = 0) -> int:
        return int(self.config.num_attention_heads)

    def head_dim(self, layer: int = 0) -> int:
        return int(self.decoder_layers[layer].attention.head_size)

    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        block = self.decoder_layers[layer]
        attn = block.attention
        hd, heads = attn.head_size, self.config.num_attention_heads
        fused = self.fused_kv(layer, attn.query_key_value, lambda: grouped_rows(heads, 3, hd, k_slot=1, v_slot=2))
        key, value = (split_heads(t, hd) for t in fused(block.input_layernorm(hidden)).chunk(2, dim=-1))
        cos, sin = rotary_cos_sin(self.base_model.rotary_emb, hidden, position_ids)
        return rotate_key(key, cos, sin, modeling_function(attn, "rotate_half")), value

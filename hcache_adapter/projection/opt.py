"""OPT: separate biased ``self_attn.k_proj``/``v_proj``, learned positions already inside h.

``do_layer_norm_before=True`` (125m, 1.3b, ...): K/V read ``self_attn_layer_norm(h)``.
``do_layer_norm_before=False`` (350m): the layer norm runs *after* attention, so
K/V read h itself.  Layers are ``base.decoder.layers``; MHA; no rotary.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import KV, Projector, split_heads
from .registry import register


@register("opt")
class OPTProjector(Projector):
    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.base_model.decoder.layers)

    def num_kv_heads(self, layer: int = 0) -> int:
        return int(self.config.num_attention_heads)

    def head_dim(self, layer: int = 0) -> int:
        return int(self.decoder_layers[layer].self_attn.head_dim)

    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        block = self.decoder_layers[layer]
        attn = block.self_attn
        x = block.self_attn_layer_norm(hidden) if block.do_layer_norm_before else hidden
        return split_heads(attn.k_proj(x), attn.head_dim), split_heads(attn.v_proj(x), attn.head_dim)

"""GPT-2: fused ``attn.c_attn`` (transformers' Conv1D, weight ``[D, 3D]``) after ``ln_1``.

K|V are output columns ``D:3D`` of the fused weight, one contiguous block: one
addmm on that block, as Conv1D does.  No rotary: learned absolute positions
(``wpe``) are added to the embeddings before layer 0, so they are inside h and
`position_ids` is ignored.  Layers are ``base.h``; MHA only (kv heads = heads).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import KV, Projector, split_heads
from .registry import register


@register("gpt2")
class GPT2Projector(Projector):
    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.base_model.h)

    def num_kv_heads(self, layer: int = 0) -> int:
        return int(self.config.num_attention_heads)

    def head_dim(self, layer: int = 0) -> int:
        return int(self.decoder_layers[layer].attn.head_dim)

    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        block = self.decoder_layers[layer]
        attn = block.attn
        d = attn.split_size
        fused = self.fused_kv(layer, attn.c_attn, lambda: slice(d, 3 * d))
        key, value = fused(block.ln_1(hidden)).chunk(2, dim=-1)
        return split_heads(key, attn.head_dim), split_heads(value, attn.head_dim)

"""Qwen3: Llama-style, plus a per-head RMSNorm ``self_attn.k_norm`` on K before rotary."""

from __future__ import annotations

from torch import Tensor, nn

from .llama import LlamaProjector
from .registry import register


@register("qwen3")
class Qwen3Projector(LlamaProjector):
    def _key_heads(self, attn: nn.Module, key: Tensor) -> Tensor:
        return attn.k_norm(key)

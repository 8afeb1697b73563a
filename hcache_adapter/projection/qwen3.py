"""Qwen3: Llama-style, plus a per-head RMSNorm ``self_attn.k_norm`` on K before rotary."""

from __future__ import annotations

from torch import nn

from .llama import LlamaProjector
from .registry import register


@register("qwen3")
class Qwen3Projector(LlamaProjector):
    def _k_norm(self, attn: nn.Module) -> nn.Module | None:
        return attn.k_norm

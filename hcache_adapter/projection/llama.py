"""Llama-style decoders: Llama, Mistral, Qwen2, Gemma (and Qwen3 in ``qwen3.py``).

Layer ``i`` is ``base.layers[i]``; its attention is ``.self_attn`` with separate
``k_proj``/``v_proj`` Linears (bias for Qwen2), after the pre-attention norm
``.input_layernorm`` (Gemma's ``1 + weight`` RMSNorm included: we call the
module).  GQA/MQA: ``k_proj`` has ``num_key_value_heads * head_dim`` outputs.
Rotary: one module for the model, ``base.rotary_emb(h, position_ids) -> cos, sin``,
applied with the modeling module's ``rotate_half``.  Gemma's embedding scale
(``sqrt(D)``) is applied before layer 0, so it is already inside h.

On a GPU the whole projection (norm, both GEMMs, the rotary tables and the
key rotation) can run as one `torch.compile`d graph shared by every layer:
the norm and the rotation then cost one memory pass each instead of several.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

from .base import KV, Projector, default_position_ids, modeling_function, rotate_key
from .registry import register

log = logging.getLogger(__name__)


def llama_kv(norm: nn.Module, k_proj: nn.Module, v_proj: nn.Module, k_norm: nn.Module | None,
             rotary_emb: nn.Module, hidden: Tensor, position_ids: Tensor, head_dim: int, rotate_half) -> KV:
    """K (rotated) and V of one Llama-style layer, from the layer's input hidden state."""
    x = norm(hidden)
    heads_shape = (*x.shape[:-1], -1, head_dim)
    key = k_proj(x).view(heads_shape)
    if k_norm is not None:
        key = k_norm(key)
    value = v_proj(x).view(heads_shape).transpose(1, 2)
    cos, sin = rotary_emb(hidden, position_ids)
    return rotate_key(key.transpose(1, 2), cos, sin, rotate_half), value


@functools.lru_cache(maxsize=1)
def _compiled_llama_kv():
    return torch.compile(llama_kv, dynamic=True)


@register("llama", "mistral", "qwen2", "gemma")
class LlamaProjector(Projector):
    compile = False  # set by the caller (HCache does on CUDA); eager everywhere else

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.base_model.layers)

    def num_kv_heads(self, layer: int = 0) -> int:
        return int(self.config.num_key_value_heads)

    def head_dim(self, layer: int = 0) -> int:
        return int(self.decoder_layers[layer].self_attn.head_dim)

    def _k_norm(self, attn: nn.Module) -> nn.Module | None:
        """A per-head norm applied to K before rotary (Qwen3), or None."""
        return None

    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        block = self.decoder_layers[layer]
        attn = block.self_attn
        args = (block.input_layernorm, attn.k_proj, attn.v_proj, self._k_norm(attn), self.base_model.rotary_emb,
                hidden, default_position_ids(hidden, position_ids), attn.head_dim, modeling_function(attn, "rotate_half"))
        if self.compile and hidden.is_cuda:
            try:
                return _compiled_llama_kv()(*args)
            except Exception as e:  # a compiler problem must never break a restore
                log.warning("compiled projection failed (%s); using eager mode from now on", e)
                type(self).compile = False
        return llama_kv(*args)

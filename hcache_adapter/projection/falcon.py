"""Falcon: one fused ``self_attention.query_key_value`` in three layouts, rotary or ALiBi.

Layouts of the fused output (``H`` query heads, ``hd`` = D / H):

* ``new_decoder_architecture`` (40B/180B): ``[kv, H/kv + 2, hd]`` per KV group,
  queries then one K then one V.  transformers before 5.25 *broadcasts* K and V to
  all ``H`` heads before caching, so the cache (and `project`) holds ``H`` heads,
  each KV head repeated ``H/kv`` times in a row, and ``num_kv_heads`` reports ``H``;
  from 5.25 (its attention has ``num_key_value_groups`` and repeats K/V itself) the
  cache holds the ``kv`` groups.
* ``multi_query`` (7B): ``[H + 2, hd]``: K and V are the last two heads, one
  contiguous block (a view of the weight); one cached head.
* classic MHA: ``[H, 3, hd]`` interleaved per head, like GPT-NeoX.

Only the K and V rows run (gathered once where interleaved), as FalconLinear
computes them: product, then bias (bit-exact in bf16, where a fused addmm is not).  Norm: ``ln_attn``
when ``new_decoder_architecture`` and ``num_ln_in_parallel_attn == 2``, otherwise
``input_layernorm``, exactly the decoder layer's own test.  Rotary (full width,
``base.rotary_emb``) unless ``config.alibi``; ALiBi biases the scores, not K.
Layers are ``base.h``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import (
    KV,
    Projector,
    RowIndex,
    grouped_rows,
    modeling_function,
    rotary_cos_sin,
    rotate_key,
    split_heads,
)
from .registry import register


@register("falcon")
class FalconProjector(Projector):
    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.base_model.h)

    def num_kv_heads(self, layer: int = 0) -> int:
        cfg = self.config
        if cfg.multi_query and not cfg.new_decoder_architecture:
            return 1
        if cfg.new_decoder_architecture and not self._cache_broadcasts(layer):
            return int(cfg.num_kv_heads)
        return int(cfg.num_attention_heads)

    def _cache_broadcasts(self, layer: int) -> bool:
        """Whether the model caches a new-architecture layer's K/V broadcast to every query head (transformers
        before 5.25) rather than its KV groups (an attention that repeats them itself has `num_key_value_groups`)."""
        return not hasattr(self.decoder_layers[layer].self_attention, "num_key_value_groups")

    def head_dim(self, layer: int = 0) -> int:
        return int(self.decoder_layers[layer].self_attention.head_dim)

    def _kv_groups(self) -> int:
        """KV heads the fused weight actually computes (before any broadcast)."""
        cfg = self.config
        if cfg.new_decoder_architecture:
            return int(cfg.num_kv_heads)
        return 1 if cfg.multi_query else int(cfg.num_attention_heads)

    def _kv_rows(self, hd: int) -> RowIndex:
        cfg, heads = self.config, int(self.config.num_attention_heads)
        if cfg.new_decoder_architecture:
            per_group = heads // int(cfg.num_kv_heads)
            return grouped_rows(int(cfg.num_kv_heads), per_group + 2, hd, k_slot=per_group, v_slot=per_group + 1)
        if cfg.multi_query:
            return slice(heads * hd, (heads + 2) * hd)
        return grouped_rows(heads, 3, hd, k_slot=1, v_slot=2)

    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        block = self.decoder_layers[layer]
        attn, cfg = block.self_attention, block.config
        hd = attn.head_dim
        if cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2:
            x = block.ln_attn(hidden)
        else:
            x = block.input_layernorm(hidden)
        qkv = attn.query_key_value
        gemm = "matmul_add" if type(qkv).forward is modeling_function(attn, "FalconLinear").forward else None
        fused = self.fused_kv(layer, qkv, lambda: self._kv_rows(hd), gemm)
        key, value = (split_heads(t, hd) for t in fused(x).chunk(2, dim=-1))
        if not cfg.alibi:
            cos, sin = rotary_cos_sin(self.base_model.rotary_emb, hidden, position_ids)
            key = rotate_key(key, cos, sin, modeling_function(attn, "rotate_half"))
        repeat = self.num_kv_heads(layer) // self._kv_groups()
        if repeat > 1:  # new decoder architecture: the cache holds every KV head `repeat` times
            key, value = (_repeat_heads(t, repeat) for t in (key, value))
        return key, value


def _repeat_heads(x: Tensor, repeat: int) -> Tensor:
    """``[B, kv, T, hd]`` -> ``[B, kv * repeat, T, hd]``, each head repeated in place (kv-major)."""
    b, kv, t, hd = x.shape
    return x[:, :, None].expand(b, kv, repeat, t, hd).reshape(b, kv * repeat, t, hd)

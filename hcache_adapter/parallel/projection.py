"""The projection of a tensor-parallel rank: K/V of this rank's heads from the whole hidden state.

Under transformers' tensor parallelism the K and V projections' weights are
DTensors split by output features, and calling the modules returns this
rank's features as a plain tensor. A projection that runs the model's own
modules therefore produces exactly this rank's shard of the cache: that is
the generic projection (issue 9, `projection/generic.py` once merged), which
serves every family this way.

Until it is merged, the Llama family's hand-written projector serves tensor
parallelism with one change: its tensor path takes the *local* shards of the
weights (`DTensor.to_local()`, a view, no copy), so it stays a plain
function of tensors that compiles and replays as a CUDA graph, and its
startup check against the model's own modules still holds (both give this
rank's heads). Other families get None here: HCache then saves each rank's
K/V shard instead ("kv"), which is always right.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from hcache_adapter.parallel.tp import local_kv_heads
from hcache_adapter.projection.llama import LlamaProjector
from hcache_adapter.projection.qwen3 import Qwen3Projector

log = logging.getLogger(__name__)


def _local(value):
    return value.to_local() if hasattr(value, "to_local") else value


class LocalShardWeights:
    """Mixin over a Llama-style projector: this rank's heads, from the local shards of the K/V weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        layers = self.decoder_layers
        self.local_kv_heads = local_kv_heads(model, layers, [self.head_dim(l) for l in range(len(layers))])

    def num_kv_heads(self, layer: int = 0) -> int:
        return self.local_kv_heads[layer]

    def _args(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        return tuple(_local(a) for a in super()._args(layer, hidden, cos, sin))


class ShardedLlamaProjector(LocalShardWeights, LlamaProjector):
    pass


class ShardedQwen3Projector(LocalShardWeights, Qwen3Projector):
    pass


# The Llama-style families whose hand-written projector reads its weights in `_args` (projection/llama.py).
_FAMILIES = {"llama": ShardedLlamaProjector, "mistral": ShardedLlamaProjector, "qwen2": ShardedLlamaProjector,
             "gemma": ShardedLlamaProjector, "qwen3": ShardedQwen3Projector}


def shard_projector(model: nn.Module):
    """A projector giving this rank's K/V heads for a tensor-parallel `model`, or None (the caller uses "kv")."""
    cls = _FAMILIES.get(getattr(model.config, "model_type", None))
    if cls is None:
        log.warning("no tensor-parallel hidden-state projection for model_type %r yet (the generic projection "
                    "will serve it); each rank saves its K/V shard instead", model.config.model_type)
        return None
    return cls(model)

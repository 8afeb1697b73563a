"""StateLayout: how one model's context state is cut into store entries.

Everything that decides what a stored chunk is lives here, fixed when HCache is
built: the model's fingerprint (so two models never share state), the key
namespace, the chunk size, the dtype, and per layer the shape of a chunk saved
as hidden state ("H": ``[C, D]``) or as K/V ("K": ``[2, kv_heads, C, head_dim]``).
Under tensor parallelism (`shard`: this rank of N) `kv_heads` are this rank's,
K/V keys name the shard and manifests of plans with K/V layers the degree;
hidden-state keys stay the same at every degree (hcache_adapter.parallel).
The saver, the restorer and the planner take a layout instead of the whole
HCache; the token-chunk arithmetic itself is hstore's (`hstore.layout`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hcache_adapter.keys import chunk_digests, layer_key, manifest_key, model_fingerprint
from hcache_adapter.manifest import HIDDEN, KV, RECOMPUTE, Manifest
from hcache_adapter.parallel.shards import Shard


@dataclass(frozen=True)
class StateLayout:
    fingerprint: str
    namespace: str
    chunk_tokens: int
    dtype: torch.dtype
    hidden_size: int | None  # None: no hidden-state projection for this model
    kv_heads: tuple[int, ...]  # per layer, heads the model's cache holds
    head_dims: tuple[int, ...]
    shard: Shard | None = None  # this rank of a tensor-parallel group; None: one process

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_tokens, int) or isinstance(self.chunk_tokens, bool) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive int, got {self.chunk_tokens!r}")
        if not self.namespace or "/" in self.namespace:
            raise ValueError(f"namespace must be a non-empty name without '/', got {self.namespace!r}")
        if len(self.kv_heads) != len(self.head_dims):
            raise ValueError("kv_heads and head_dims must give one value per layer")

    @classmethod
    def for_model(cls, model: torch.nn.Module, projector, *, namespace: str, chunk_tokens: int,
                  model_id: str | None = None) -> "StateLayout":
        """The layout of `model` (K/V shapes from its projector when it has one, else from its config)."""
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        dtype = next(model.parameters()).dtype
        if projector is not None:
            layers = projector.num_layers
            kv_heads = tuple(int(projector.num_kv_heads(l)) for l in range(layers))
            head_dims = tuple(int(projector.head_dim(l)) for l in range(layers))
            hidden = int(projector.hidden_size)
        else:  # no projection: the config's attention shape (none at all for attention-free models)
            layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
            heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
            kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
            hd = int(getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0))
            kv_heads, head_dims, hidden = (kv,) * layers, (hd,) * layers, None
        return cls(model_id or model_fingerprint(model), namespace, chunk_tokens, dtype, hidden, kv_heads, head_dims)

    # -- sizes -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def chunk_shape(self, layer: int, kind: str) -> tuple[int, ...]:
        """Shape of one stored chunk of `layer` saved as `kind` ("H" or "K")."""
        if kind == HIDDEN:
            if self.hidden_size is None:
                raise ValueError("this model has no hidden-state projection: nothing is saved as H")
            return (self.chunk_tokens, self.hidden_size)
        if kind == KV:
            return (2, self.kv_heads[layer], self.chunk_tokens, self.head_dims[layer])
        raise ValueError(f"layers saved as {kind!r} have no stored chunks")

    def bytes_per_token(self, layer: int, kind: str) -> int:
        """Bytes stored per token for `layer` saved as `kind` (0 for recomputed layers)."""
        if kind == RECOMPUTE:
            return 0
        n = 1
        for d in self.chunk_shape(layer, kind):
            n *= d
        return n * self.itemsize // self.chunk_tokens

    def plan_bytes_per_token(self, plan: str) -> int:
        return sum(self.bytes_per_token(l, k) for l, k in enumerate(plan))

    def whole_chunks(self, n_tokens: int) -> int:
        """Whole chunks in a prefix that must leave at least one token to run: (n - 1) // C."""
        return max(n_tokens - 1, 0) // self.chunk_tokens

    def check_plan(self, plan: str) -> None:
        if len(plan) != self.num_layers or set(plan) - {HIDDEN, KV, RECOMPUTE}:
            raise ValueError(f"plan must be {self.num_layers} letters of H (hidden), K (K/V), R (recompute)")
        if HIDDEN in plan and self.hidden_size is None:
            raise ValueError("this architecture has no projection: a plan cannot use H")

    # -- keys --------------------------------------------------------------------
    def digests(self, token_ids: Sequence[int] | torch.Tensor, *, after: str | None = None) -> list[str]:
        """Chained digests of the whole chunks of `token_ids` (continuing `after`)."""
        return chunk_digests(self.fingerprint, token_ids, self.chunk_tokens, after=after)

    def chunk_key(self, digest: str, kind: str, layer: int) -> str:
        if kind == HIDDEN:
            return layer_key(self.namespace, digest, "h", layer)
        return layer_key(self.namespace, digest, "kv", layer) + (self.shard.key_suffix if self.shard else "")

    @property
    def kv_shards(self) -> int:
        """Ranks the K/V heads are split over (1: one process)."""
        return self.shard.world if self.shard else 1

    def manifest_key(self, digest: str) -> str:
        return manifest_key(self.namespace, digest)

    def layer_keys(self, digests: Sequence[str] | Sequence[bytes], kind: str, layer: int) -> list[str] | list[bytes]:
        """`chunk_key` of every digest, built by concatenation (a 16K restore names 8,192 keys). Digests given
        as bytes (`str.encode`d once per restore, not once per layer) give the keys as bytes, what the store
        holds: it then neither encodes them nor, on a second lookup of the same key objects, hashes them again."""
        head, tail = self.chunk_key("\0", kind, layer).split("\0")
        if digests and isinstance(digests[0], bytes):
            head, tail = head.encode(), tail.encode()
        return [head + d + tail for d in digests]

    def manifest(self, plan: str) -> Manifest:
        return Manifest(self.fingerprint, plan, self.chunk_tokens, self.dtype_name,
                        kv_shards=self.kv_shards if KV in plan else 1)

    def accepts(self, man: Manifest | None) -> bool:
        """Whether a stored manifest describes state this layout can restore."""
        return (
            man is not None
            and man.fingerprint == self.fingerprint
            and man.chunk_tokens == self.chunk_tokens
            and man.dtype == self.dtype_name
            and len(man.plan) == self.num_layers
            and (self.hidden_size is not None or HIDDEN not in man.plan)
            and (KV not in man.plan or man.kv_shards == self.kv_shards)  # K/V shards of another degree
        )

"""A transformers Cache whose restored layers are made ready just in time.

`generate()` runs its own prefill of the new tokens on top of a restored
prefix. With a `LazyCache` it does so while the prefix is still being
restored: layer i's K/V is produced (loaded, projected from hidden states, or
recomputed) on side streams, and only when the model's attention at layer i
calls `update()` does the layer take it, the compute stream waiting on an
event, not the host. In every other respect the cache is a `DynamicCache`
(crop, reorder, batch ops, length, dtype, device): a layer that anything touches
is made ready first, so every generation mode keeps working.

A layer's K/V comes from a `LayerSource`, which the restorer implements; the
cache knows nothing about stores or projections.
"""
from __future__ import annotations

from typing import Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class LayerSource(Protocol):
    def take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ([B, kv_heads, n, head_dim]) of `layer`, usable on the caller's current stream.

        Called once per layer, from the thread that runs the model.
        """


class LazyLayer(DynamicLayer):
    """A full-attention layer holding `n_tokens` restored positions that are fetched on first use."""

    def __init__(self, source: LayerSource, layer_idx: int, n_tokens: int, dtype: torch.dtype, device: torch.device):
        self._pending: LayerSource | None = source
        self._layer_idx = layer_idx
        self._n = n_tokens
        self._keys = self._values = None
        super().__init__()
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    # keys/values are what every DynamicLayer method and caller reads: fetch on first access
    @property
    def keys(self) -> torch.Tensor:
        if self._pending is not None:
            self.materialize()
        return self._keys

    @keys.setter
    def keys(self, value) -> None:
        self._keys = value

    @property
    def values(self) -> torch.Tensor:
        if self._pending is not None:
            self.materialize()
        return self._values

    @values.setter
    def values(self, value) -> None:
        self._values = value

    @property
    def ready(self) -> bool:
        return self._pending is None

    def defer(self, source: LayerSource, n_tokens: int) -> None:
        """Hand the layer's content over to `source` again, holding `n_tokens` positions until fetched
        (the captured prefill leaves K/V in graph memory: copied out only when something reads them)."""
        self._pending, self._n = source, n_tokens
        self._keys = self._values = None

    def materialize(self) -> None:
        source, self._pending = self._pending, None
        if source is not None:
            self._keys, self._values = source.take(self._layer_idx)

    def get_seq_length(self) -> int:
        if self._pending is not None:
            return self._n
        return super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class LazyCache(DynamicCache):
    """A DynamicCache laid out for the model, whose restored full-attention layers are `LazyLayer`s."""

    @classmethod
    def for_model(cls, config) -> "LazyCache":
        return cls(config=config)

    def make_lazy(self, layer_idx: int, source: LayerSource, n_tokens: int, dtype: torch.dtype,
                  device: torch.device) -> bool:
        """Turn an empty plain layer into a lazy one; False when the layer type must be filled eagerly."""
        layer = self.layers[layer_idx]
        if type(layer) is not DynamicLayer or layer.is_initialized:
            return False
        self.layers[layer_idx] = LazyLayer(source, layer_idx, n_tokens, dtype, torch.device(device))
        return True

    def materialize(self) -> "LazyCache":
        """Fetch every pending layer now (for callers that hand the cache elsewhere)."""
        for layer in self.layers:
            if isinstance(layer, LazyLayer):
                layer.materialize()
        return self

    @property
    def pending_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, LazyLayer) and not layer.ready]

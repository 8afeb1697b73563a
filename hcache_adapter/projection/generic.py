"""The generic projection: a decoder layer's cache state from its input hidden state, by the model's own code.

For layer l, `GenericProjector` calls the decoder layer itself on the stored
hidden state, with the arguments the model's forward would pass it for these
positions (``calls.py``: rotary tables, masks, position ids, learned once per
restore), and a `CapturingCache` (``capture.py``) as its cache.  The layer runs
its input norm, its attention's projections, q/k norms and rotary, whatever
its code does, up to the point where it writes its cache; the capturing cache
ends the call there.  What the model would have put in its cache is what the
projection returns, so there is nothing per family here and nothing to keep
in step with transformers.

What it saves compared with running the layer: attention and the MLP never
run; the query projection of a separate ``q_proj``-style Linear is cut to one
head where the probe showed that the layer's K/V are unchanged by it
(``queries.py``); the per-restore work (the model's rotary and mask code) runs
once per restore, not once per layer.

Layers whose state is not plain K/V (sliding windows keep a tail, recurrent
layers keep conv and SSM states, indexed layers keep indexer keys, compressed
layers their own summaries) are served the same way: the layer's own cache
writes go through a fresh cache layer of the model's own class, and that
filled layer object is the restored state (`project_state`, `fill_prefix`).
Layers that write no cache of their own (shared-KV consumers, MLP-only
blocks) have nothing to restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hcache_adapter.compat import fill_layer

from .base import KV, Projector
from .calls import LayerCall, record_layer_calls
from .capture import CacheWritten, CapturingCache
from .queries import QuerySlice

log = logging.getLogger(__name__)


class NoKVCache(RuntimeError):
    """Raised by `GenericProjector.project` for a layer whose cache state is not (only) K and V."""


@dataclass(frozen=True)
class LayerPlan:
    """What the probe learned about one decoder layer (see ``support.py``)."""

    writes: int  # cache writes the layer makes per forward; 0: no cache of its own
    plain_kv: bool  # its cache holds exactly the K/V of its one `update` call
    output_arity: int  # what the layer returns: 0 a tensor, n a tuple of n (for the recording stubs)
    kv_heads: int = 0  # K heads given to `update` (0: no update)
    k_dim: int = 0
    v_dim: int = 0
    slots: tuple[int, ...] = ()  # the cache layers it writes
    stop_early: bool = True  # end the call at its last cache write (else it runs whole)
    query: QuerySlice | None = None


@dataclass
class _Calls:
    key: tuple[Any, ...]
    positions: Tensor
    cache: CapturingCache
    calls: list[LayerCall]


class GenericProjector(Projector):
    """`Projector` for any decoder through its own modules (module doc); built by `support()` from a probe."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], plans: Sequence[LayerPlan],
                 hidden_shape: tuple[int, ...]):
        """`hidden_shape`: one token's input to a decoder layer, ``(hidden,)`` or ``(streams, hidden)``."""
        super().__init__(model)
        if len(layers) != len(plans):
            raise ValueError("one plan per decoder layer")
        self._layers = list(layers)
        self.plans = list(plans)
        self.hidden_shape = tuple(hidden_shape)
        self._calls: _Calls | None = None

    # ------------------------------------------------------------------ layout
    @property
    def decoder_layers(self) -> list[nn.Module]:
        return self._layers

    @property
    def hidden_size(self) -> int:
        """Values per token of a saved hidden state (all streams of a hyper-connection model, flattened)."""
        return math.prod(self.hidden_shape)

    def num_kv_heads(self, layer: int = 0) -> int:
        return self.plans[layer].kv_heads

    def head_dim(self, layer: int = 0) -> int:
        return self.plans[layer].k_dim

    def v_head_dim(self, layer: int = 0) -> int:
        return self.plans[layer].v_dim

    def kv_bytes_per_token(self, layer: int = 0) -> int:
        p = self.plans[layer]
        return p.kv_heads * (p.k_dim + p.v_dim) * self.dtype.itemsize

    def run_whole(self, layer: int) -> None:
        """Let `layer`'s projection run the layer to its end (its cache changes after its last write call)."""
        self.plans[layer] = dataclasses.replace(self.plans[layer], stop_early=False)

    def adopt_query_slice(self, layer: int, query: QuerySlice, hidden: Tensor, position_ids: Tensor) -> bool:
        """Project `layer` with this one-head query from now on if its K/V stay bit for bit the same."""
        plan = self.plans[layer]
        if plan.query is not None or not plan.plain_kv:
            return False
        want = self.project(layer, hidden, position_ids)
        self.plans[layer] = dataclasses.replace(plan, query=query)
        try:
            got = self.project(layer, hidden, position_ids)
            same = all(a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all()) for a, b in zip(got, want))
        except Exception:  # the attention cannot work with a one-head query: keep the full one
            same = False
        if not same:
            self.plans[layer] = plan
        return same

    # -------------------------------------------------------------- projection
    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        plan = self.plans[layer]
        if plan.writes == 0 or plan.kv_heads == 0:
            raise NoKVCache(f"layer {layer} keeps no K/V cache of its own")
        kv, _ = self._run(layer, hidden, position_ids, keep_state=not plan.plain_kv)
        return kv

    def project_state(self, layer: int, hidden: Tensor, position_ids: Tensor | None = None) -> dict[int, Any]:
        """{cache slot: the model's cache layer object} for decoder layer `layer`, as a prefill of these
        positions leaves them; empty for a layer that keeps no cache of its own."""
        if self.plans[layer].writes == 0:
            return {}
        with torch.no_grad():
            _, states = self._run(layer, hidden, position_ids, keep_state=True)
        return states

    def fill_prefix(self, cache: Any, layer: int, hidden: Tensor, position_ids: Tensor) -> None:
        plan = self.plans[layer]
        if plan.writes == 0:
            return  # nothing of its own: shared K/V of another layer, or no attention at all
        if plan.plain_kv:
            k, v = self.project_prefix(layer, hidden, position_ids)
            fill_layer(cache, plan.slots[0], k, v)
            return
        for slot, state in self.project_state(layer, hidden, position_ids).items():
            cache.layers[slot] = state

    # ------------------------------------------------------------------ engine
    def _positions(self, hidden: Tensor, position_ids: Tensor | None) -> Tensor:
        if position_ids is not None:
            return position_ids
        return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)

    def _calls_for(self, hidden: Tensor, position_ids: Tensor | None) -> _Calls:
        """The layers' call arguments for these positions: recorded once, reused while the same tensor is given."""
        positions = self._positions(hidden, position_ids)
        key = (hidden.shape[0], hidden.shape[1], hidden.device, hidden.dtype, position_ids is None)
        c = self._calls
        if c is not None and c.key == key and (position_ids is None or c.positions is position_ids):
            return c
        start = 0 if position_ids is None or position_ids.numel() == 0 else int(position_ids[0, 0])
        cache = CapturingCache(self.config, past_length=start)
        calls = record_layer_calls(self.base_model, self._layers, cache, hidden.shape[0], positions,
                                   hidden.device, [p.output_arity for p in self.plans])
        self._calls = _Calls(key, position_ids if position_ids is not None else positions, cache, calls)
        return self._calls

    def _run(self, layer: int, hidden: Tensor, position_ids: Tensor | None, keep_state: bool
             ) -> tuple[KV, dict[int, Any]]:
        """Call decoder layer `layer` on `hidden` until it has written its cache: (the K/V of its first update,
        {slot: filled cache layer} when `keep_state`)."""
        plan = self.plans[layer]
        c = self._calls_for(hidden, position_ids)
        if len(self.hidden_shape) > 1:  # stored flat: the layer takes its streams apart
            hidden = hidden.reshape(*hidden.shape[:2], *self.hidden_shape)
        query = plan.query
        while True:
            # A layer that changes its cache layer after its last write (DeepSeek-V4's compressor buffers) runs whole.
            writes = plan.writes if plan.stop_early else sys.maxsize
            c.cache.arm(layer, plan.slots, writes, plain_kv=not keep_state)
            try:
                with query.applied() if query is not None else contextlib.nullcontext():
                    c.calls[layer].call(self._layers[layer], hidden)
            except CacheWritten:
                break
            except Exception as e:
                c.cache.disarm()
                if query is None:
                    raise
                log.warning("projecting layer %d with a one-head query failed (%s); using the full query", layer, e)
                self.plans[layer] = plan = dataclasses.replace(plan, query=None)
                query = None
                continue
            if not plan.stop_early:
                break
            c.cache.disarm()
            raise RuntimeError(f"decoder layer {layer} returned without writing its cache")
        capture = c.cache.disarm()
        states = {slot: c.cache.take_layer(slot) for slot in plan.slots} if keep_state else {}
        if capture.kv is None:
            return (None, None), states  # type: ignore[return-value]
        return capture.kv, states

"""A cache that records what a decoder layer writes into it, and ends the layer's call there.

The generic projection runs a decoder layer's own forward on a stored hidden
state; the only thing it wants from that call is what the layer writes into
its cache.  `CapturingCache` is the model's own cache layout
(``DynamicCache(config=...)``: full, sliding, indexed, linear-attention or
dummy layers, whatever the config asks for) whose write methods (``update``,
``update_conv_state``, ``update_recurrent_state``, ``update_indexer``, the ones
this transformers version has) are watched:

* while `armed` for one layer, each write of that layer is counted; when the
  count reaches the number of writes that layer makes in a real forward (learned
  once by the probe, see ``support.py``), `CacheWritten` is raised and the rest
  of the layer (attention, MLP) never runs;
* a layer whose cache is plain K/V (one ``update``, a `DynamicLayer` or
  `DynamicSlidingWindowLayer`) does not even run the layer's ``update``: its
  K and V are the arguments of that call (`kv_written`), so nothing is copied;
  every other layer's write goes through the real cache layer, which then holds
  exactly what the model's prefill would have left there;
* not armed, writes go through and are only logged (`writes`): that is how the
  probe learns which layer writes what, in which order.

A layer whose state is not a K/V cache therefore is not a special case: its
cache layer object, filled by the model's own code, is the restored state.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

try:
    from transformers.cache_utils import DummyLayer
except ImportError:  # a transformers without shared-KV layers
    DummyLayer = None

# Every method through which a transformers layer writes cache state, where it exists.
WRITE_METHODS = tuple(
    name for name in ("update", "update_conv_state", "update_recurrent_state", "update_indexer")
    if callable(getattr(DynamicCache, name, None))
)
# Cache layers that hold exactly the K/V tensors given to their `update` (a sliding one keeps the window's tail).
PLAIN_KV_LAYERS: tuple[type, ...] = (DynamicLayer, DynamicSlidingWindowLayer)


class CacheWritten(Exception):
    """Raised inside a layer's call once it has written all of its cache state (ends the call)."""


def _layer_idx_position(method: str) -> int:
    """Where ``layer_idx`` sits among a write method's positional arguments (after self)."""
    params = list(inspect.signature(getattr(DynamicCache, method)).parameters)
    return params.index("layer_idx") - 1


_LAYER_IDX_AT = {name: _layer_idx_position(name) for name in WRITE_METHODS}


@dataclass
class Arm:
    """What the cache watches for while one decoder layer is projected."""

    layer: int
    slots: tuple[int, ...]  # the cache layers it writes
    writes: int  # writes that layer makes in a real forward: the last one ends the call
    plain_kv: bool  # skip the real update: the K/V arguments are the whole state
    seen: int = 0


@dataclass
class Capture:
    """What one armed call left behind."""

    kv: tuple[Tensor, Tensor] | None = None  # the arguments of the layer's `update`, if it made one
    methods: list[str] = field(default_factory=list)


class CapturingCache(DynamicCache):
    """``DynamicCache(config=...)`` that logs every write and, armed for a layer, stops its call (module doc)."""

    def __init__(self, config: Any, past_length: int = 0) -> None:
        super().__init__(config=config)
        self.model_config = config
        self.past_length = past_length  # a prefix that does not start at 0 reports its offset as cached length
        self.writes: list[tuple[int, str]] = []  # (layer, method), in call order, while not armed
        self.write_shapes: dict[int, list[tuple[int, ...]]] = {}  # layer -> shapes of its update() arguments
        self._arm: Arm | None = None
        self._capture = Capture()

    # ----------------------------------------------------------------- arming
    def arm(self, layer: int, slots: tuple[int, ...], writes: int, plain_kv: bool) -> None:
        self._arm = Arm(layer, slots, writes, plain_kv)
        self._capture = Capture()
        if not plain_kv:
            for slot in slots:
                self._fresh_layer(slot)

    def disarm(self) -> Capture:
        capture, self._arm, self._capture = self._capture, None, Capture()
        return capture

    def take_layer(self, slot: int) -> Any:
        """The cache layer object `slot` filled during the last armed call (replaced by a fresh one here)."""
        filled = self.layers[slot]
        self._fresh_layer(slot)
        return filled

    def _fresh_layer(self, layer: int) -> None:
        if getattr(self.layers[layer], "is_initialized", False) and not is_dummy_layer(self.layers[layer]):
            self.layers[layer] = DynamicCache(config=self.model_config).layers[layer]

    # ---------------------------------------------------------------- lengths
    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        if self.past_length:
            return self.past_length
        return super().get_seq_length(*args, **kwargs)

    # ----------------------------------------------------------------- writes
    def _write(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        at = _LAYER_IDX_AT[method]
        layer = kwargs["layer_idx"] if "layer_idx" in kwargs else args[at]
        arm = self._arm
        if arm is None:
            self.writes.append((layer, method))
            if method == "update":
                self.write_shapes.setdefault(layer, []).extend(tuple(t.shape) for t in args[:2])
            return getattr(super(), method)(*args, **kwargs)
        if layer not in arm.slots:
            raise RuntimeError(f"decoder layer {arm.layer} wrote cache layer {layer}, not one of {arm.slots}")
        arm.seen += 1
        self._capture.methods.append(method)
        if method == "update" and self._capture.kv is None:
            self._capture.kv = (args[0], args[1])
        last = arm.seen >= arm.writes
        if last and arm.plain_kv:
            raise CacheWritten
        out = getattr(super(), method)(*args, **kwargs)
        if last:
            raise CacheWritten
        return out


def _make_write(method: str):
    def write(self: CapturingCache, *args: Any, **kwargs: Any) -> Any:
        return self._write(method, args, kwargs)

    write.__name__ = method
    write.__doc__ = f"`{method}` of the model's cache, watched (see `CapturingCache`)."
    return write


for _method in WRITE_METHODS:
    setattr(CapturingCache, _method, _make_write(_method))

def is_plain_kv_layer(layer: Any) -> bool:
    """A cache layer that holds exactly the K/V tensors given to its `update` (no other state)."""
    return type(layer) in PLAIN_KV_LAYERS


def is_dummy_layer(layer: Any) -> bool:
    return DummyLayer is not None and isinstance(layer, DummyLayer)


def layer_state(layer: Any) -> dict[str, Any]:
    """Everything a cache layer holds, flattened: tensors and int / bool / float counters by attribute path.

    Nested dicts and lists (linear-attention layers keep ``{state_idx: tensor}``)
    are walked; devices, dtypes and other objects describe a layer, not its state.
    """
    state: dict[str, Any] = {}

    def walk(path: str, value: Any) -> None:
        if isinstance(value, Tensor) or value is None or isinstance(value, (bool, int, float)):
            state[path] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{path}[{k!r}]", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v)

    for name, value in vars(layer).items():
        walk(name, value)
    return state


def state_difference(got: Any, want: Any) -> tuple[float, str]:
    """(max abs difference, where) between two cache layers' states; ``inf`` on any structural difference."""
    a, b = layer_state(got), layer_state(want)
    if a.keys() != b.keys():
        return float("inf"), f"state fields {sorted(set(a) ^ set(b))} present in one only"
    worst, where = 0.0, ""
    for name in a:
        s, t = a[name], b[name]
        if not (isinstance(s, Tensor) and isinstance(t, Tensor)):
            if isinstance(s, Tensor) or isinstance(t, Tensor) or s != t:
                return float("inf"), f"{name}: {_brief(s)} vs {_brief(t)}"
            continue
        if s.shape != t.shape or s.dtype != t.dtype:
            return float("inf"), f"{name}: {tuple(s.shape)} {s.dtype} vs {tuple(t.shape)} {t.dtype}"
        if s.numel() == 0:
            continue
        if s.is_floating_point():
            if not torch.equal(s.isnan(), t.isnan()):
                return float("inf"), f"{name}: NaN in one only"
            d = (s.double() - t.double()).nan_to_num(0.0).abs().max().item()
        else:
            d = 0.0 if torch.equal(s, t) else float("inf")
        if d > worst:
            worst, where = d, name
    return worst, where


def state_scale(layer: Any) -> float:
    """The largest magnitude among a cache layer's floating tensors (what tolerances are relative to)."""
    m = 0.0
    for t in layer_state(layer).values():
        if isinstance(t, Tensor) and t.is_floating_point() and t.numel():
            m = max(m, t.detach().abs().nan_to_num(0.0).max().item())
    return m


def _brief(value: Any) -> str:
    return f"tensor{tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)

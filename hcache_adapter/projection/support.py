"""How HCache can serve a model, decided up front by a probe of the model itself.

    s = support(model)
    s.kind       # "hidden" | "kv" | "recompute" | "refused"
    s.reason     # why not "hidden" (empty when it is)
    s.projector  # the Projector to use when kind == "hidden" (a fast path or the generic one), else None
    s.layers     # per decoder layer: its cache kind ("full", "sliding" + window, "shared", "recurrent", ...)

HCache calls this in its constructor and falls back or raises from it, so a
model whose state cannot be restored is known before anything is stored, never
in the middle of ``generate()``.

The decision rests on measurements of the model itself, a few tokens long:

* the probe (``probe.py``): one prefill through the model's own forward finds
  the decoder layers, each layer's cache writes (``update`` for K/V, conv /
  recurrent / indexer writes, none for shared-KV or MLP-only layers) and the
  cache layer class the model uses for it (full, sliding window and its size);
* continuation (``continuation.py``): a filled cache continued by the model
  (and by ``generate()``) must give what one pass over all tokens gives, in
  one forward of the new tokens ("chunk") or one token at a time ("step");
  otherwise no restored state, hidden or K/V, would be right;
* every layer's state is rebuilt by the generic projection from its input in
  the probe and compared with what the prefill left in the cache.  Only a match
  to rounding (1e-5 relative in float32) makes the model "hidden"; a registered
  fast path is then used if it matches too (``registry.py``).

The probe costs three short prefills and a few projections of the model, once,
when HCache is constructed.

Kinds, in order of preference:

* ``hidden``: every layer's cache state is rebuilt from its input hidden state.
* ``kv``: not rebuildable, but every layer's cache is plain full-attention K/V of
  one shape, which HCache can save and reload as it is.
* ``recompute``: neither; HCache stores nothing and ``generate()`` is the
  model's own (the state is recomputed from tokens).
* ``refused``: HCache cannot serve the model at all (not a decoder-only causal
  LM, or its forward cannot run with a transformers cache).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from .base import Projector
from .capture import is_dummy_layer, is_plain_kv_layer, state_difference, state_scale
from .continuation import CHUNK, continuation, new_tokens_only
from .generic import GenericProjector, LayerPlan
from .probe import PROBE_TOKENS, Probe, run_probe
from .queries import query_slices

log = logging.getLogger(__name__)

HIDDEN, KV, RECOMPUTE, REFUSED = "hidden", "kv", "recompute", "refused"
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
HALF_TOLERANCE = 2e-2  # float16 / bfloat16: a restored state differs from a prefill by rounding only
WINDOW_PROBE_LIMIT = {"cuda": 8192, "cpu": 512}  # longest prefix the continuation check runs to cross a window


@dataclass(frozen=True)
class LayerSupport:
    """One decoder layer's cache, as the model's own prefill leaves it."""

    kind: str  # "full" | "sliding" | "shared" (no cache of its own) | "recurrent" | "hybrid" | "indexed" | other
    window: int | None = None  # sliding window size (tokens kept: window - 1)
    writes: tuple[str, ...] = ()  # the cache methods it calls per forward, in order
    cache_class: str = ""
    kv_shape: tuple[int, ...] | None = None  # per token: (K heads, K width, V heads, V width) of its update()
    slots: tuple[int, ...] = ()  # the cache layers it writes (its own index, or two for LongCat's double blocks)

    @property
    def plain_kv(self) -> bool:
        """The cache holds K and V of every position, of one shape (what method "kv" can save as it is)."""
        return self.kind == "full" and self._one_kv

    @property
    def sliding_kv(self) -> bool:
        """K and V of one shape, of the last `window - 1` positions only."""
        return self.kind == "sliding" and self._one_kv

    @property
    def _one_kv(self) -> bool:
        return (self.writes == ("update",) and self.kv_shape is not None and self.kv_shape[:2] == self.kv_shape[2:]
                and len(self.slots) == 1)


@dataclass(frozen=True)
class Support:
    kind: str
    reason: str = ""
    projector: Projector | None = None
    layers: tuple[LayerSupport, ...] = ()
    decoder_layers: tuple[nn.Module, ...] = ()
    max_error: float = float("nan")  # the probe's largest difference, restored state vs prefill
    fast_path: bool = False  # projector is a hand-written one from the registry
    continuation: str = CHUNK  # after a restore: "chunk" (one forward of the new tokens) or "step" (one at a time)
    new_tokens_only: bool = False  # generate() on a restored cache must be given only the tokens after it
    hidden_shape: tuple[int, ...] = ()  # one token's saved state: (hidden,), or (streams, hidden) (hyper-connections)

    def __post_init__(self) -> None:
        if self.kind not in (HIDDEN, KV, RECOMPUTE, REFUSED):
            raise ValueError(f"unknown support kind {self.kind!r}")
        if (self.kind == HIDDEN) != (self.projector is not None):
            raise ValueError("a projector goes with kind 'hidden', and only with it")

    @property
    def summary(self) -> str:
        return self.kind if not self.reason else f"{self.kind}: {self.reason}"


# --------------------------------------------------------------------------- entry
def support(model: nn.Module, fast_path: Callable[[nn.Module], Projector | None] | None = None) -> Support:
    """How HCache can serve `model` (a ``*ForCausalLM`` or its base model); see the module doc.

    `fast_path(model)` gives the registry's hand-written projector for the model's
    type, or None; it is used only if it reproduces the probe's cache too.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return Support(REFUSED, f"{type(model).__name__} is not a transformers model")
    if getattr(config, "is_encoder_decoder", False):
        return Support(REFUSED, "an encoder-decoder model (HCache restores a decoder-only model's cache)")
    if any(p.is_meta for p in model.parameters()):
        fast = fast_path(model) if fast_path is not None else None
        if fast is not None:
            return Support(HIDDEN, "", fast, decoder_layers=tuple(fast.decoder_layers), fast_path=True)
        return Support(REFUSED, "its weights are on the meta device: the probe cannot run")
    n_layers = int(getattr(config.get_text_config(decoder=True), "num_hidden_layers", 0) or 0)
    base = getattr(model, "base_model", model)
    was_training = model.training
    model.eval()
    try:
        return _decide(model, base, n_layers, fast_path)
    finally:
        model.train(was_training)


def _decide(model: nn.Module, base: nn.Module, n_layers: int, fast_path) -> Support:
    probe = run_probe(model, base, n_layers)
    if isinstance(probe, str):
        return Support(REFUSED if "DynamicCache" in probe else RECOMPUTE, probe)
    layers = tuple(_layer_support(probe, i) for i in range(len(probe.layers)))
    decoder_layers = tuple(probe.layers)
    if not any(ls.writes for ls in layers):
        return Support(RECOMPUTE, "it keeps no cache (every step recomputes every position)", None, layers,
                       decoder_layers)
    tol = _tolerance(probe.hidden[0].dtype)
    ids, prefix = _continuation_tokens(probe, layers)
    mode, why = continuation(model, base, ids, prefix, tol)
    if mode is None:  # no restored state of any kind would be right: K/V offload relies on the same property
        return Support(RECOMPUTE, why, None, layers, decoder_layers)
    linear = new_tokens_only(probe.cache)
    why = _not_rebuildable(probe, layers)
    if not why:
        proj = GenericProjector(model, probe.layers, _plans(probe, layers), tuple(probe.hidden[0].shape[2:]))
        err, why = _check_states(proj, probe, tol)
        if not why:
            _adopt_query_slices(proj, probe, model.config.get_text_config(decoder=True))
            fast = _checked_fast_path(model, fast_path, probe, layers, tol)
            return Support(HIDDEN, "", fast or proj, layers, decoder_layers, err, fast is not None, mode, linear,
                           proj.hidden_shape)
        why = f"not rebuildable from hidden states: {why}"
    kind = KV if all(ls.plain_kv for ls in layers) else RECOMPUTE
    return Support(kind, why, None, layers, decoder_layers, continuation=mode, new_tokens_only=linear)


# --------------------------------------------------------------------------- facts
def _layer_support(probe: Probe, i: int) -> LayerSupport:
    slots = probe.slots(i)
    layer = probe.cache.layers[slots[0]] if slots and slots[0] < len(probe.cache.layers) else None
    cls = type(layer).__name__ if layer is not None else ""
    name = cls.lower()
    if layer is None or is_dummy_layer(layer):
        kind = "shared"  # nothing of its own: another layer's K/V, or no attention at all
    elif "linearattentionand" in name:
        kind = "hybrid"
    elif "linearattention" in name:
        kind = "recurrent"
    elif "indexed" in name:
        kind = "indexed"
    elif is_plain_kv_layer(layer):
        kind = "sliding" if getattr(layer, "is_sliding", False) else "full"
    else:
        kind = cls
    window = getattr(layer, "sliding_window", None)
    shapes = probe.cache.write_shapes.get(slots[0]) if slots else None
    kv_shape = (shapes[0][1], shapes[0][3], shapes[1][1], shapes[1][3]) if shapes and all(
        len(s) == 4 for s in shapes[:2]) else None
    writes = tuple(method for _, method in probe.writes[i])
    return LayerSupport(kind, int(window) if window is not None else None, writes, cls, kv_shape, slots)


def _plans(probe: Probe, layers: tuple[LayerSupport, ...]) -> list[LayerPlan]:
    plans = []
    for i, ls in enumerate(layers):
        plain = ls.writes == ("update",) and ls.kind in ("full", "sliding") and len(ls.slots) == 1
        heads, k_dim, v_dim = (ls.kv_shape[0], ls.kv_shape[1], ls.kv_shape[3]) if ls.kv_shape else (0, 0, 0)
        if "update" not in ls.writes:
            heads = k_dim = v_dim = 0
        plans.append(LayerPlan(len(ls.writes), plain, probe.output_arity[i], heads, k_dim, v_dim, ls.slots))
    return plans


def _tolerance(dtype: torch.dtype) -> float:
    return RELATIVE_TOLERANCE.get(dtype, HALF_TOLERANCE)


def _not_rebuildable(probe: Probe, layers: tuple[LayerSupport, ...]) -> str:
    """Why the probe rules out rebuilding from hidden states before trying, or empty."""
    owner: dict[int, int] = {}
    for i, ls in enumerate(layers):
        for slot in ls.slots:
            if owner.setdefault(slot, i) != i:
                return f"layers {owner[slot]} and {i} both write cache layer {slot}"
    widths = {tuple(h.shape[2:]) for h in probe.hidden}
    if len(widths) != 1:
        return f"its decoder layers' hidden states differ in shape ({sorted(widths)})"
    bad = [i for i, ls in enumerate(layers) if ls.writes.count("update") > len(ls.slots)]
    return f"layer {bad[0]} writes K/V more than once per forward" if bad else ""


def _continuation_tokens(probe: Probe, layers: tuple[LayerSupport, ...]) -> tuple[Tensor, int]:
    """Token ids and prefix length for the continuation check: past the longest sliding window when there is one
    (a sliding layer behaves differently once it is full), within what the device does quickly."""
    windows = [ls.window for ls in layers if ls.window]
    limit = WINDOW_PROBE_LIMIT["cuda" if probe.ids.is_cuda else "cpu"]
    if not windows or max(windows) + 2 > limit:
        return probe.ids, PROBE_TOKENS
    prefix = max(windows) + 2
    more = torch.randint(min(3, probe.vocab - 1), probe.vocab, (1, prefix - PROBE_TOKENS),
                         generator=torch.Generator().manual_seed(2)).to(probe.ids.device)
    return torch.cat([probe.ids[:, :PROBE_TOKENS], more, probe.ids[:, PROBE_TOKENS:]], dim=1), prefix


# --------------------------------------------------------------------------- checks
def _check_states(proj: GenericProjector, probe: Probe, tol: float) -> tuple[float, str]:
    """(largest relative difference, first failure) of every layer's rebuilt state against the prefill's.

    A layer whose state is not plain K/V and does not match when its call ends at its last cache write is
    tried once more running whole (its cache layer changes after that write)."""
    worst = 0.0
    for i, plan in enumerate(proj.plans):
        if plan.writes == 0:
            continue
        err, why = _check_layer(proj, probe, i)
        if err > tol and not plan.plain_kv:
            proj.run_whole(i)
            err, why = _check_layer(proj, probe, i)
        if err > tol:
            return err, f"layer {i}'s rebuilt cache differs from the model's ({why})"
        worst = max(worst, err)
    return worst, ""


def _check_layer(proj: GenericProjector, probe: Probe, i: int) -> tuple[float, str]:
    positions = torch.arange(PROBE_TOKENS, device=probe.hidden[0].device).unsqueeze(0)
    restored = DynamicCache(config=proj.config)
    try:
        proj.fill_prefix(restored, i, probe.hidden[i].flatten(2), positions)  # rows as HCache stores them
    except Exception as e:
        return float("inf"), f"projecting it failed: {type(e).__name__}: {str(e)[:160]}"
    worst, why = 0.0, ""
    for slot in proj.plans[i].slots:
        diff, where = state_difference(restored.layers[slot], probe.cache.layers[slot])
        rel = diff / max(1.0, state_scale(probe.cache.layers[slot]))
        if rel >= worst:
            worst, why = rel, f"{where}: {diff:.3g}"
    return worst, why


def _adopt_query_slices(proj: GenericProjector, probe: Probe, text_config: Any) -> None:
    positions = torch.arange(PROBE_TOKENS, device=probe.hidden[0].device).unsqueeze(0)
    for i, plan in enumerate(proj.plans):
        if plan.plain_kv:
            for q in query_slices(probe.layers[i], text_config):
                if proj.adopt_query_slice(i, q, probe.hidden[i].flatten(2), positions):
                    break


def _checked_fast_path(model, fast_path, probe: Probe, layers, tol: float) -> Projector | None:
    """The registry's projector for the model, if it reproduces every layer's K/V of the probe."""
    if fast_path is None or not all(ls.writes == ("update",) and ls.kind in ("full", "sliding")
                                    and ls.slots == (i,) for i, ls in enumerate(layers)):
        return None  # hand-written paths cover one plain K/V cache layer per decoder layer
    try:
        fast = fast_path(model)
    except Exception as e:  # a fast path that cannot bind to this model is just not used
        log.warning("the fast projection of %s failed to build (%s); using the generic one", type(model).__name__, e)
        return None
    if fast is None:
        return None
    positions = torch.arange(PROBE_TOKENS, device=probe.hidden[0].device).unsqueeze(0)
    try:
        for i in range(len(layers)):
            k, v = fast.project(i, probe.hidden[i].flatten(2), positions)
            ref = probe.cache.layers[i]
            kept = ref.keys.shape[-2]  # a sliding layer keeps only the tail of the window
            k, v = k[..., -kept:, :], v[..., -kept:, :]
            if k.shape != ref.keys.shape or v.shape != ref.values.shape:
                raise ValueError(f"layer {i}: shapes {tuple(k.shape)} vs {tuple(ref.keys.shape)}")
            scale = max(1.0, ref.keys.abs().max().item(), ref.values.abs().max().item())
            diff = max((k - ref.keys).abs().max().item(), (v - ref.values).abs().max().item())
            if diff / scale > tol:
                raise ValueError(f"layer {i} differs by {diff:.3g}")
    except Exception as e:
        log.warning("the fast projection of %s does not match the model's cache (%s); using the generic one",
                    type(model).__name__, e)
        return None
    return fast

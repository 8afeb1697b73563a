"""The `Projector` interface: rebuild a decoder layer's K and V from its input hidden state.

HCache saves, for every decoder layer, the hidden state that enters the layer
(one ``[T, D]`` row block per layer) instead of that layer's K and V
(``2 * kv_heads * head_dim`` per token).  Restoring the KV cache then costs one
norm, the K and V GEMMs and the key's rotary embedding per layer; the query
projection, attention and MLP are skipped.

A `Projector` is bound to one model instance and knows where that architecture
keeps its decoder layers, its attention norm, its K/V weights and its rotary
module.  Each family lives in a module named after transformers' own module
(``llama.py``, ``gpt_neox.py``, ...) and registers itself by ``config.model_type``
(see ``hcache_adapter.projection.registry``).

Capturing the hidden state: register a forward pre-hook (``with_kwargs=True``)
on every module of `Projector.decoder_layers`; the hidden state is the first
positional argument, or the ``hidden_states`` keyword when a caller passes it by
name.  `Projector.hidden_from_call` does exactly that.  Every family supported
here passes it positionally, in transformers 5.17 and 5.24 alike.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from hcache_adapter.compat import fill_layer

KV = tuple[Tensor, Tensor]
RowIndex = slice | Tensor


class Projector(ABC):
    """Rebuilds the K and V a model's attention stores in its cache, layer by layer.

    Bound to one model (a ``*ForCausalLM`` or its base model).  Shapes follow
    transformers' cache: `project` returns ``K, V`` of shape
    ``[B, num_kv_heads(layer), T, head_dim(layer)]``, equal to what that layer's
    attention passes to ``cache.update(...)``.  ``num_kv_heads`` therefore counts
    the heads *stored in the cache*, which is more than the model's KV heads where
    transformers repeats them before caching (Falcon's new decoder architecture).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        # PreTrainedModel.base_model is `getattr(self, base_model_prefix, self)`: the
        # *Model inside a *ForCausalLM, or the model itself when given the base model.
        self.base_model: nn.Module = getattr(model, "base_model", model)
        self._fused_kv: dict[int, FusedKV] = {}

    # ------------------------------------------------------------------ layout
    @property
    @abstractmethod
    def decoder_layers(self) -> list[nn.Module]:
        """The modules whose forward input is the hidden state to save, in layer order."""

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @abstractmethod
    def num_kv_heads(self, layer: int = 0) -> int:
        """Heads in the K (and V) tensors that the model caches for `layer`."""

    @abstractmethod
    def head_dim(self, layer: int = 0) -> int:
        """Width of one cached K (or V) head in `layer`."""

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype (that of its first floating parameter)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def hidden_bytes_per_token(self, layer: int = 0) -> int:
        """Bytes HCache saves per token for `layer`: one hidden row of D values (same for every layer)."""
        return self.hidden_size * self.dtype.itemsize

    def kv_bytes_per_token(self, layer: int = 0) -> int:
        """Bytes the model's cache holds per token for `layer`: K plus V."""
        return 2 * self.num_kv_heads(layer) * self.head_dim(layer) * self.dtype.itemsize

    @staticmethod
    def hidden_from_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The hidden state out of a decoder layer's call, as a forward pre-hook sees it."""
        return args[0] if args else kwargs["hidden_states"]

    # -------------------------------------------------------------- projection
    def fused_kv(
        self, layer: int, module: nn.Module, rows: Callable[[], RowIndex], gemm: str | None = None
    ) -> FusedKV:
        """The cached `FusedKV` of `layer`'s fused qkv `module`; `rows()` is called on first use."""
        fused = self._fused_kv.get(layer)
        if fused is None or fused.module is not module:
            fused = self._fused_kv[layer] = FusedKV(module, rows(), gemm)
        return fused

    @abstractmethod
    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        """Family-specific `project`, already under ``torch.no_grad()``."""

    def project(self, layer_idx: int, hidden: Tensor, position_ids: Tensor | None = None) -> KV:
        """K and V of decoder layer `layer_idx` for the tokens whose input hidden state is `hidden`.

        hidden: ``[B, T, D]``, the layer's input (before its attention norm).
        position_ids: ``[B, T]`` absolute positions of those tokens; used only by
            rotary models, and ``arange(T)`` when omitted (a prefix starting at 0).
        Returns ``(K, V)``, each ``[B, num_kv_heads, T, head_dim]``, K already rotated.
        """
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer {layer_idx} out of range for {self.num_layers} layers")
        with torch.no_grad():
            return self._project(layer_idx, hidden, position_ids)

    def project_prefix(self, layer_idx: int, hidden: Tensor, position_ids: Tensor, out: KV | None = None,
                       out_rows: int | None = None) -> KV:
        """`project` for a restored prefix: one sequence whose positions are ``arange(T)``.

        `position_ids` must be exactly that (the caller made it); families that
        can replay a captured graph for this common case do (see ``graphs.py``).
        `out`: tensors to write K and V into (e.g. a static cache's rows), returned.
        `out_rows`: how many rows along the sequence `out`'s storage may be written
        (rows past T are free: a static cache's new-token and padding rows), so a
        graph of a padded length may write there in place; None: T only.
        """
        return copy_into(self.project(layer_idx, hidden, position_ids), out)

    def fill_prefix(self, cache: Any, layer_idx: int, hidden: Tensor, position_ids: Tensor) -> None:
        """Restore layer `layer_idx` of a transformers `cache` from its input hidden state (a prefix from 0).

        What the model's prefill would have left in that cache layer: for K/V
        layers `project_prefix` then the layer's own fill; the generic projector
        also rebuilds layers whose state is not only K/V (see ``generic.py``).
        """
        k, v = self.project_prefix(layer_idx, hidden, position_ids)
        fill_layer(cache, layer_idx, k, v)


# ---------------------------------------------------------------------- rotary
def modeling_function(module: nn.Module, name: str) -> Callable[..., Any]:
    """A function (e.g. ``rotate_half``) of the modeling module that defines `module`'s class."""
    return getattr(sys.modules[type(module).__module__], name)


def default_position_ids(hidden: Tensor, position_ids: Tensor | None) -> Tensor:
    if position_ids is not None:
        return position_ids
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def rotary_cos_sin(rotary_emb: nn.Module, hidden: Tensor, position_ids: Tensor | None) -> KV:
    """``cos, sin`` from the model's own rotary module, called as the model calls it."""
    return rotary_emb(hidden, default_position_ids(hidden, position_ids))


def rotate_key(
    key: Tensor, cos: Tensor, sin: Tensor, rotate_half: Callable[[Tensor], Tensor]
) -> Tensor:
    """Rotary embedding of the key alone, as transformers' ``apply_rotary_pos_emb`` does it.

    key: ``[B, H, T, head_dim]``; cos, sin: ``[B, T, rotary_dim]``.  When
    ``rotary_dim < head_dim`` (GPT-NeoX ``rotary_pct``, Phi-3
    ``partial_rotary_factor``) only the first ``rotary_dim`` features rotate and the
    rest pass through, which is what those models' own functions do.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    if rotary_dim == key.shape[-1]:
        return (key * cos) + (rotate_half(key) * sin)
    k_rot, k_pass = key[..., :rotary_dim], key[..., rotary_dim:]
    return torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """``[B, T, H * head_dim]`` -> ``[B, H, T, head_dim]`` (a view)."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


# --------------------------------------------------------- fused qkv weights
def grouped_rows(groups: int, slots: int, head_dim: int, k_slot: int, v_slot: int) -> Tensor:
    """Output features of a fused projection laid out ``[groups, slots, head_dim]``.

    Picks slot `k_slot` then slot `v_slot` of every group, returning the feature
    indices ordered ``[K of all groups, V of all groups]`` (so the selected output
    splits into K and V halves).  GPT-NeoX and classic Falcon use ``slots=3``
    per head; Falcon's new decoder architecture uses ``slots = q_per_kv + 2``.
    """
    idx = torch.arange(groups * slots * head_dim).view(groups, slots, head_dim)
    return torch.cat([idx[:, k_slot].reshape(-1), idx[:, v_slot].reshape(-1)])


def _as_slice(rows: RowIndex) -> RowIndex:
    """A consecutive index run as a slice (a view of the weight, no copy)."""
    if isinstance(rows, slice) or rows.numel() == 0:
        return rows
    start = int(rows[0])
    if torch.equal(rows, torch.arange(start, start + rows.numel())):
        return slice(start, start + rows.numel())
    return rows


def _tensor_key(t: Tensor | None) -> tuple[Any, ...] | None:
    if t is None:
        return None
    # Inference tensors (made under torch.inference_mode) cannot be edited in place
    # outside it and have no version counter.
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), version)


@dataclass
class _SelectedWeights:
    key: tuple[Any, ...]
    weight: Tensor
    bias: Tensor | None


class FusedKV:
    """Runs only the K and V rows of one fused qkv projection module.

    `rows` names the K features then the V features in the module's output
    order.  A consecutive run is taken as a view of the weight; a scattered one
    (per-head interleaved layouts) is gathered once into a contiguous copy.  The
    selection is cached and rebuilt when the module's weight or bias tensor
    changes (``.to()``, ``load_state_dict``, in-place edits: keyed on data
    pointer, device, dtype, shape and version counter).

    `gemm` says how the module computes ``y`` so the sliced product rounds the
    same way: ``"linear"`` (``F.linear``, nn.Linear), ``"conv1d"`` (transformers'
    Conv1D, weight ``[in, out]``, ``addmm``), ``"matmul_add"`` (``x @ W.T`` then
    ``+ b``, FalconLinear: in bf16 the separate bias add rounds differently from
    a fused addmm).  Left out, it is inferred from ``type(module).forward``; a
    module whose forward is unknown (a quantized linear, ...) is ``"module"``: it
    cannot be sliced, so its full output is computed and K/V features selected.
    """

    def __init__(self, module: nn.Module, rows: RowIndex, gemm: str | None = None) -> None:
        self.module = module
        self.rows = _as_slice(rows)
        self.gemm = gemm or _GEMM_OF_FORWARD.get(type(module).forward, "module")
        if self.gemm not in ("linear", "matmul_add", "conv1d", "module"):
            raise ValueError(f"unknown gemm {self.gemm!r}")
        self._cached: _SelectedWeights | None = None

    def _select(self) -> _SelectedWeights:
        weight, bias = self.module.weight, getattr(self.module, "bias", None)
        key = (_tensor_key(weight), _tensor_key(bias))
        if self._cached is None or self._cached.key != key:
            rows = self.rows
            if isinstance(rows, Tensor):
                rows = rows.to(weight.device)
            w = weight[:, rows] if self.gemm == "conv1d" else weight[rows]
            b = None if bias is None else bias[rows]
            if isinstance(rows, Tensor):  # advanced indexing already copied; make it dense
                w = w.contiguous()
            self._cached = _SelectedWeights(key, w.detach(), None if b is None else b.detach())
        return self._cached

    def __call__(self, x: Tensor) -> Tensor:
        """``[..., in]`` -> ``[..., len(rows)]``: the K features followed by the V features."""
        if self.gemm == "module":
            out = self.module(x)
            rows = self.rows if isinstance(self.rows, slice) else self.rows.to(out.device)
            return out[..., rows]
        sel = self._select()
        if self.gemm == "conv1d":  # transformers' Conv1D.forward: addmm(bias, x2d, weight)
            x2d = x.reshape(-1, x.shape[-1])
            out = torch.addmm(sel.bias, x2d, sel.weight) if sel.bias is not None else x2d @ sel.weight
            return out.view(*x.shape[:-1], out.shape[-1])
        if self.gemm == "matmul_add":  # bias added after the product, in the model's dtype
            out = x @ sel.weight.T
            return out if sel.bias is None else out + sel.bias
        return nn.functional.linear(x, sel.weight, sel.bias)


# How a module's forward computes its output, keyed by the forward function itself
# (a subclass that overrides forward, e.g. a quantized Linear, is not in here).
_GEMM_OF_FORWARD: dict[Callable[..., Any], str] = {nn.Linear.forward: "linear", Conv1D.forward: "conv1d"}


def copy_into(kv: KV, out: KV | None) -> KV:
    """`kv`, or `out` with `kv` copied in."""
    if out is None:
        return kv
    out[0].copy_(kv[0])
    out[1].copy_(kv[1])
    return out

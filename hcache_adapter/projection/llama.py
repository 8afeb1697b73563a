"""Llama-style decoders: Llama, Mistral, Qwen2, Gemma (and Qwen3 in ``qwen3.py``).

Layer ``i`` is ``base.layers[i]``; its attention is ``.self_attn`` with separate
``k_proj``/``v_proj`` Linears (bias for Qwen2), after the pre-attention norm
``.input_layernorm`` (Gemma's ``1 + weight`` RMSNorm included). GQA/MQA:
``k_proj`` has ``num_key_value_heads * head_dim`` outputs. Rotary: one module
for the model, ``base.rotary_emb(h, position_ids) -> cos, sin``, the same for
every layer, so a restore computes it once and reuses it for all layers.

The projection itself is a function of tensors only (`llama_kv`): the norm is
written out as transformers writes it for the RMSNorm classes it knows, so on a
GPU it can run as one `torch.compile`d graph whose guards check a few tensors
(guards over module objects cost ~0.7 ms a call, more than the GPU work).
Whether our norm matches the model's module is checked once per projector on a
few random rows; a norm we do not know, or one that differs, is called as a
module (eager), which is always exact.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

from .base import KV, Projector, copy_into, default_position_ids, modeling_function, rotate_key
from .graphs import PrefixGraphs
from .registry import register

log = logging.getLogger(__name__)

# RMSNorm classes whose forward `rms_norm` reproduces, by the style of their formula.
_RMS_STYLE = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "llama", "Qwen2RMSNorm": "llama",
              "Qwen3RMSNorm": "llama", "GemmaRMSNorm": "gemma"}


def rms_norm(x: Tensor, weight: Tensor, eps: float, style: str) -> Tensor:
    """transformers' RMSNorm, op for op: "llama" scales in the input dtype, "gemma" by (1 + w) in float32."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if style == "gemma":
        return (xf * (1.0 + weight.float())).type_as(x)
    return weight * xf.to(x.dtype)


def llama_kv(hidden: Tensor, norm_w: Tensor, norm_eps: float, norm_style: str, wk: Tensor, bk: Tensor | None,
             wv: Tensor, bv: Tensor | None, knorm_w: Tensor | None, knorm_eps: float, cos: Tensor, sin: Tensor,
             head_dim: int, rotate_half) -> KV:
    """K (rotated) and V of one Llama-style layer from its input hidden state; tensors in, tensors out."""
    x = rms_norm(hidden, norm_w, norm_eps, norm_style)
    heads_shape = (*x.shape[:-1], -1, head_dim)
    key = nn.functional.linear(x, wk, bk).view(heads_shape)
    if knorm_w is not None:
        key = rms_norm(key, knorm_w, knorm_eps, "llama")
    value = nn.functional.linear(x, wv, bv).view(heads_shape).transpose(1, 2)
    return rotate_key(key.transpose(1, 2), cos, sin, rotate_half), value


def llama_kv_into(k_out: Tensor, v_out: Tensor, *args) -> None:
    """`llama_kv(*args)` written into `k_out`, `v_out` ([1, kv_heads, T, head_dim], any strides: a graph's outputs
    or a static cache's rows).

    Compiled, each copy fuses into the kernel that makes the tensor (K: the rotary; V: the transposition out of
    the GEMM's layout): one pass over each, where returning K/V and copying them out took two more. Measured on
    the lent H200 (7B shape, 4K): those copies were 4.1 of the restore's 18.1 ms of GPU time."""
    k, v = llama_kv(*args)
    k_out.copy_(k)
    v_out.copy_(v)


def heads_linear(x: Tensor, weight: Tensor, bias: Tensor | None, head_dim: int, out: Tensor | None = None) -> Tensor:
    """`x` [1, T, D] through a Linear's `weight` head by head: [heads, T, head_dim], the layout a cache holds.

    One batched GEMM over the heads (x broadcast, each head's rows of the weight), so the product lands in the
    cache's layout instead of [T, heads * head_dim] plus a transposing copy. `out`: [heads, T, head_dim] of any
    batch stride (a static cache's rows), written in place."""
    heads = weight.shape[0] // head_dim
    xb = x[0].expand(heads, *x.shape[1:])
    wh = weight.view(heads, head_dim, -1).transpose(1, 2)
    if bias is None:
        return torch.bmm(xb, wh) if out is None else torch.bmm(xb, wh, out=out)
    b = bias.view(heads, 1, head_dim)
    return torch.baddbmm(b, xb, wh) if out is None else torch.baddbmm(b, xb, wh, out=out)


def rope_into(k_out: Tensor, key: Tensor, cos: Tensor, sin: Tensor, rotate_half, knorm_w: Tensor | None,
              knorm_eps: float) -> None:
    """K's per-head norm (Qwen3) and rotary applied to `key` [1, heads, T, head_dim], written into `k_out`."""
    if knorm_w is not None:
        key = rms_norm(key, knorm_w, knorm_eps, "llama")
    k_out.copy_(rotate_key(key, cos, sin, rotate_half))


def llama_kv_heads_into(k_out: Tensor, v_out: Tensor, hidden: Tensor, norm_w: Tensor, norm_eps: float,
                        norm_style: str, wk: Tensor, bk: Tensor | None, wv: Tensor, bv: Tensor | None,
                        knorm_w: Tensor | None, knorm_eps: float, cos: Tensor, sin: Tensor, head_dim: int,
                        rotate_half, *, norm=rms_norm, rope=rope_into) -> None:
    """`llama_kv_into` with per-head GEMMs (`heads_linear`): V is written by its GEMM straight into `v_out`, K
    by the rotary. `norm`, `rope`: compiled forms of `rms_norm` and `rope_into` on a GPU. Equal to `llama_kv`
    up to the GEMMs' rounding (another kernel, another order of sums), not bit for bit."""
    x = norm(hidden, norm_w, norm_eps, norm_style)
    rope(k_out, heads_linear(x, wk, bk, head_dim).unsqueeze(0), cos, sin, rotate_half, knorm_w, knorm_eps)
    heads_linear(x, wv, bv, head_dim, out=v_out[0])


@functools.lru_cache(maxsize=1)
def _compiled_llama_kv():
    return torch.compile(llama_kv, dynamic=True)


@functools.lru_cache(maxsize=4)
def _static_llama_kv(rows: int):
    """`llama_kv` compiled for one length bucket (static shapes): what a graph of that bucket replays.

    Static-shape kernels ran the 7B shape's 32 projections in 14.3 ms of GPU
    time against 19.9 ms with dynamic shapes and 26.5 ms eager (lent H200, 4096
    tokens, each replayed from a graph: benchmarks/restore_experiments.py); the
    compile costs ~2 s, paid when a bucket is captured (its second use).
    """
    return torch.compile(llama_kv, dynamic=False)


@functools.lru_cache(maxsize=4)
def _static_llama_kv_into(rows: int):
    """`llama_kv_into` compiled for one length bucket (see `_static_llama_kv`)."""
    return torch.compile(llama_kv_into, dynamic=False)


@functools.lru_cache(maxsize=1)
def _static_pieces():
    """`rms_norm` and `rope_into` compiled with static shapes: `llama_kv_heads_into`'s fused parts."""
    return torch.compile(rms_norm, dynamic=False), torch.compile(rope_into, dynamic=False)


def _norm_spec(norm: nn.Module | None) -> tuple[str, float] | None:
    """(style, eps) of a norm module `rms_norm` can stand in for, else None."""
    if norm is None:
        return None
    style = _RMS_STYLE.get(type(norm).__name__)
    if style is None or not type(norm).__module__.startswith("transformers.models."):
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return (style, float(eps)) if eps is not None else None


@register("llama", "mistral", "qwen2", "gemma")
class LlamaProjector(Projector):
    compile = False  # set by the caller (HCache does on CUDA); eager everywhere else
    graphs = False  # replay CUDA graphs in project_prefix (HCache turns it on with CUDA)
    sm_carveout: int | None = None  # SMs the graphs' GEMMs leave free for a forward beside them (PrefixGraphs)
    heads_gemm = False  # with write_in_place: graphs project per head (`llama_kv_heads_into`), V in the cache's layout
    # Graphs write K/V into their outputs or the caller's destination (`llama_kv_into`) instead of copying them
    # there; read when the first graph is made. On the lent H200 it cut the 7B/4K restore's GPU time per layer by
    # a fifth (0.57 -> 0.46 ms, a kernel trace of its stream).
    write_in_place = True
    read_in_place = True  # destination graphs of unpadded lengths read the loaded hidden state where it lies

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._rope: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # (position_ids, hidden probe, cos, sin)
        self._tensor_path: bool | None = None  # None: not yet checked against the modules
        self._graphs: PrefixGraphs | None = None
        if not any(p.is_meta for p in model.parameters()):
            self._use_tensor_path()  # now, not inside the first (possibly timed or traced) projection

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

    def _cos_sin(self, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The rotary tables for `position_ids`, computed once and reused while the same tensor is passed."""
        r = self._rope
        if r is not None and r[0] is position_ids and r[1].dtype == hidden.dtype and r[1].device == hidden.device:
            return r[2], r[3]
        cos, sin = self.base_model.rotary_emb(hidden, position_ids)
        self._rope = (position_ids, hidden[:0], cos, sin)
        return cos, sin

    def _args(self, layer: int, hidden: Tensor, cos: Tensor, sin: Tensor) -> tuple:
        block = self.decoder_layers[layer]
        attn = block.self_attn
        style, eps = _norm_spec(block.input_layernorm)
        k_norm = self._k_norm(attn)
        knorm_w, knorm_eps = (None, 0.0) if k_norm is None else (k_norm.weight, _norm_spec(k_norm)[1])
        return (hidden, block.input_layernorm.weight, eps, style, attn.k_proj.weight, attn.k_proj.bias,
                attn.v_proj.weight, attn.v_proj.bias, knorm_w, knorm_eps, cos, sin, attn.head_dim,
                modeling_function(attn, "rotate_half"))

    def _module_kv(self, layer: int, hidden: Tensor, cos: Tensor, sin: Tensor) -> KV:
        """The same projection through the model's own modules (always exact; eager)."""
        attn = self.decoder_layers[layer].self_attn
        x = self.decoder_layers[layer].input_layernorm(hidden)
        heads_shape = (*x.shape[:-1], -1, attn.head_dim)
        key = attn.k_proj(x).view(heads_shape)
        k_norm = self._k_norm(attn)
        if k_norm is not None:
            key = k_norm(key)
        value = attn.v_proj(x).view(heads_shape).transpose(1, 2)
        return rotate_key(key.transpose(1, 2), cos, sin, modeling_function(attn, "rotate_half")), value

    @property
    def uses_tensor_path(self) -> bool:
        """Whether projections run the tensors-only `llama_kv` (known norms, plain Linears) rather than the modules."""
        return self._use_tensor_path()

    @property
    def graph_replays(self) -> int:
        """Layer projections served by replaying a captured CUDA graph so far (0 without graphs)."""
        return self._graphs.replays if self._graphs is not None else 0

    @property
    def graph_captures(self) -> int:
        """CUDA graphs captured for layer projections so far (0 without graphs)."""
        return self._graphs.captures if self._graphs is not None else 0

    @property
    def direct_graph_replays(self) -> int:
        """Of those, replays that wrote K/V straight into the caller's destination (no copy out)."""
        return self._graphs.direct_replays if self._graphs is not None else 0

    @property
    def in_place_input_replays(self) -> int:
        """Of those, replays that read the hidden state where the caller holds it (no copy in)."""
        return self._graphs.in_place_inputs if self._graphs is not None else 0

    def _use_tensor_path(self) -> bool:
        """Whether `llama_kv` stands in for the modules: known norms, and equal on a few random rows."""
        if self._tensor_path is None:
            attn = self.decoder_layers[0].self_attn
            known = all(_norm_spec(self.decoder_layers[i].input_layernorm) for i in range(self.num_layers)) and (
                self._k_norm(attn) is None or _norm_spec(self._k_norm(attn)) is not None)
            if known and not (isinstance(attn.k_proj, nn.Linear) and isinstance(attn.v_proj, nn.Linear)):
                known = False  # a quantized or otherwise custom Linear: call it as a module
            if known:
                weight = attn.k_proj.weight
                probe = torch.randn(1, 4, self.hidden_size, generator=torch.Generator().manual_seed(0))
                probe = probe.to(weight.device, self.dtype)
                pos = torch.arange(4, device=weight.device).unsqueeze(0)
                with torch.no_grad():
                    cos, sin = self.base_model.rotary_emb(probe, pos)
                    ours = llama_kv(*self._args(0, probe, cos, sin))
                    theirs = self._module_kv(0, probe, cos, sin)
                known = all(torch.equal(a, b) for a, b in zip(ours, theirs))
                if not known:
                    log.warning("the norm of %s differs from hcache's copy of it; projecting through the modules",
                                type(self.model).__name__)
            self._tensor_path = known
        return self._tensor_path

    def project_prefix(self, layer_idx: int, hidden: Tensor, position_ids: Tensor, out: KV | None = None,
                       out_rows: int | None = None) -> KV:
        if self.graphs and hidden.is_cuda and hidden.shape[0] == 1 and self._use_tensor_path():
            if self._graphs is None:
                into = dict(fn_into=self._graph_kv_into, kv_shape=self._kv_shape) if self.write_in_place else {}
                self._graphs = PrefixGraphs(self._graph_kv, self.base_model.rotary_emb, sm_carveout=self.sm_carveout,
                                            read_in_place=self.read_in_place, **into)
            try:
                with torch.no_grad():
                    kv = self._graphs.project(layer_idx, hidden, out=out, out_rows=out_rows)
                if kv is not None:
                    return kv
            except Exception as e:  # a capture problem must never break a restore
                log.warning("CUDA graph projection failed (%s); not using graphs from now on", e)
                self.graphs = False
                self._graphs = None
        return copy_into(self.project(layer_idx, hidden, position_ids), out)

    def _tensor_kv(self, layer: int, hidden: Tensor, cos: Tensor, sin: Tensor) -> KV:
        args = self._args(layer, hidden, cos, sin)
        if self.compile and hidden.is_cuda:
            try:
                return _compiled_llama_kv()(*args)
            except Exception as e:  # a compiler problem must never break a restore
                log.warning("compiled projection failed (%s); using eager mode from now on", e)
                self.compile = False  # the instance's flag: HCache sets it per instance
        return llama_kv(*args)

    def _graph_kv(self, layer: int, hidden: Tensor, cos: Tensor, sin: Tensor) -> KV:
        """What a bucket's graph captures: the static-shape compiled projection (eager if compiling fails)."""
        if self.compile and hidden.is_cuda:
            try:
                return _static_llama_kv(hidden.shape[1])(*self._args(layer, hidden, cos, sin))
            except Exception as e:  # a compiler problem must never break a restore
                log.warning("static-shape compiled projection failed (%s); graphs hold the dynamic one", e)
        return self._tensor_kv(layer, hidden, cos, sin)

    def _graph_kv_into(self, layer: int, hidden: Tensor, cos: Tensor, sin: Tensor, k_out: Tensor,
                       v_out: Tensor) -> None:
        """What a graph that writes its K/V in place captures: `llama_kv_into`, or `llama_kv_heads_into` with
        `heads_gemm`, compiled for the bucket (eager if compiling fails)."""
        args = self._args(layer, hidden, cos, sin)
        if self.compile and hidden.is_cuda:
            try:
                if self.heads_gemm:
                    norm, rope = _static_pieces()
                    return llama_kv_heads_into(k_out, v_out, *args, norm=norm, rope=rope)
                return _static_llama_kv_into(hidden.shape[1])(k_out, v_out, *args)
            except Exception as e:  # a compiler problem must never break a restore
                log.warning("static-shape compiled projection into its outputs failed (%s); eager", e)
        llama_kv_into(k_out, v_out, *args)

    def _kv_shape(self, layer: int, rows: int) -> tuple[int, int, int, int]:
        """Shape of one layer's K (and V) for `rows` positions of one sequence."""
        return (1, self.num_kv_heads(layer), rows, self.head_dim(layer))

    def _project(self, layer: int, hidden: Tensor, position_ids: Tensor | None) -> KV:
        cos, sin = self._cos_sin(hidden, default_position_ids(hidden, position_ids))
        if not self._use_tensor_path():
            return self._module_kv(layer, hidden, cos, sin)
        return self._tensor_kv(layer, hidden, cos, sin)

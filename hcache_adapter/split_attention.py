"""Split-KV attention of a few queries over a long cache, for the captured first forward.

After a restore, generate()'s first forward runs a few dozen new tokens' attention over the whole
restored prefix. A fused attention kernel parallelises over heads and blocks of queries: 32 heads and
one block of 32 queries is 32 thread blocks on the H200's 132 SMs, most of the GPU idle. Eager attention
spreads over the GPU, but writes and reads the float32 score matrix several times: at 16K that traffic is
as large as the K/V themselves. Here (as flash-decoding does) the keys are cut into `splits` pieces that
run as the batch of one fused kernel, each piece returning its log-sum-exp, and the pieces' outputs are
merged by those weights: `splits` x K/V heads thread blocks, each key read once, no score matrix.

Registered with transformers' `AttentionInterface` as `NAME`, so a model runs it through its own
attention modules (`model.set_attn_implementation(NAME)`). It takes what the captured prefill gives
(batch 1, an additive float mask, no dropout); anything else, or a key length the pieces cannot split,
runs the model's own eager attention. On a CPU the pieces run as explicit math (how the splitting is tested).
Where Triton is, `flash_decoding`'s kernels run instead: the same splitting, the keys read at the memory's
bandwidth, the padding rows of a bucket not at all, the merge written in the module's layout.
"""
from __future__ import annotations

import logging
import sys

import torch
from torch import Tensor

from hcache_adapter import flash_decoding
from hcache_adapter.flash_decoding import MIN_PIECE, TARGET_BLOCKS  # the same splitting, one set of tunables

log = logging.getLogger(__name__)

NAME = "hcache_split_kv"
QUERY_BLOCK = 64  # queries per thread block of the fused kernel (its tile along the queries)
ALIGN = 16  # keys per piece a multiple of this: the fused kernel reads the mask's rows in aligned vectors
_fused_failed = False  # set when the fused kernel refused a call: eager attention from then on
_triton_failed = False  # set when the Triton kernels failed: the fused kernel's pieces from then on
use_triton = True  # False: run the fused kernel's pieces even where Triton is (how the two are compared)


def choose_splits(n_keys: int, kv_heads: int, queries: int) -> int:
    """Pieces to cut `n_keys` into: enough blocks to fill the GPU, pieces of >= MIN_PIECE keys (a multiple
    of ALIGN), a divisor."""
    blocks = kv_heads * max(1, -(-queries // QUERY_BLOCK))
    want = max(1, min(-(-TARGET_BLOCKS // blocks), n_keys // MIN_PIECE))
    for s in range(want, 1, -1):
        if n_keys % s == 0 and (n_keys // s) % ALIGN == 0:
            return s
    return 1


def attend(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float, splits: int | None = None) -> Tensor:
    """softmax(q k^T * scale + bias) v for one sequence: query [1, H, M, D], key/value [1, Hkv, N, D]
    (H a multiple of Hkv, grouped as transformers repeats K/V), bias [1, 1, M, N] additive; -> [1, H, M, D]."""
    _, H, M, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    G = H // Hkv
    GM = G * M
    S = choose_splits(N, Hkv, GM) if splits is None else splits
    if N % S:
        raise ValueError(f"{N} keys do not split into {S} pieces")
    P = N // S
    q = query.reshape(1, Hkv, GM, D).expand(S, Hkv, GM, D)  # a group's heads attend as one block of queries
    k = key[0].view(Hkv, S, P, D).transpose(0, 1)  # [S, Hkv, P, D]: views, the keys are not copied
    v = value[0].view(Hkv, S, P, D).transpose(0, 1)
    b = bias[0, 0]
    if G > 1:
        b = b.unsqueeze(0).expand(G, M, N).reshape(GM, N)
    b = b.reshape(GM, S, P).transpose(0, 1).contiguous().unsqueeze(1).expand(S, Hkv, GM, P)
    out, lse = _pieces(q, k, v, b, scale)  # [S, Hkv, GM, D], [S, Hkv, GM] (float32)
    w = torch.softmax(lse, dim=0).unsqueeze(-1)
    merged = (out.float() * w).sum(0)  # [Hkv, GM, D]
    return merged.to(query.dtype).view(1, H, M, D)


def _pieces(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Each batch entry's attention and its log-sum-exp: the fused kernel on a GPU, the math elsewhere."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.contiguous(), k, v, bias, True, 0.0, False, scale=scale)[:2]
        return out, lse[..., : q.shape[2]]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()), lse


def split_kv_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: -> (output [B, M, H, D], no weights)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    usable = (not _fused_failed and query.shape[0] == 1 and attention_mask is not None
              and attention_mask.dim() == 4 and attention_mask.shape[:3] == (1, 1, query.shape[2])
              and attention_mask.shape[3] >= key.shape[2] and attention_mask.is_floating_point()
              and query.shape[-1] % 8 == 0
              and (dropout == 0.0 or not module.training) and kwargs.get("sliding_window") is None
              and getattr(module, "is_causal", True) and query.shape[1] % key.shape[1] == 0
              and key.is_contiguous() and value.is_contiguous())
    if usable and use_triton and not _triton_failed and flash_decoding.available(query) and flash_decoding.supports(
            query, key, value, attention_mask[0, 0]):
        try:
            return flash_decoding.attend(query, key, value, attention_mask[0, 0], scale), None
        except Exception as e:  # Triton could not build or launch the kernels (seen at the warm-up, before capture)
            if query.is_cuda and torch.cuda.is_current_stream_capturing():
                raise
            _give_up_triton(e)
    if usable:
        bias = attention_mask[..., : key.shape[-2]]
        splits = choose_splits(key.shape[2], key.shape[1], query.shape[2] * (query.shape[1] // key.shape[1]))
        if splits > 1:
            try:
                out = attend(query, key, value, bias, scale, splits)
                return out.transpose(1, 2).contiguous(), None
            except RuntimeError as e:  # the fused kernel refused these inputs (seen before any capture: its warm-up)
                if query.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise
                _give_up(e)
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is not None:  # the model's own eager attention, as the "eager" implementation would have run it
        return own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return eager_attention(module, query, key, value, attention_mask, scale, dropout)


def _give_up(error: Exception) -> None:
    global _fused_failed
    _fused_failed = True
    log.warning("split-KV attention failed (%s); the captured prefill runs eager attention from now on", error)


def _give_up_triton(error: Exception) -> None:
    global _triton_failed
    _triton_failed = True
    log.warning("flash-decoding kernels failed (%s); the captured prefill runs the fused kernel's pieces", error)


def eager_attention(module, query, key, value, attention_mask, scale, dropout) -> tuple[Tensor, None]:
    """Eager attention as transformers writes it: the reference the pieces are checked against, and the
    fall-back for a module whose modeling file has no `eager_attention_forward` of its own."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # as transformers' repeat_kv: no copy without groups
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `NAME` a transformers attention implementation (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, split_kv_attention)
    return NAME

"""Token chunking of per-layer hidden states.

HCache saves an LLM's per-layer input hidden states in fixed-size token chunks
(64 tokens by default) so that a prefix can be stored, evicted and restored a
chunk at a time, and restored layer by layer. These functions hold the index
math of that scheme and nothing else: no I/O, no store, no model.

Conventions: a *layer-major* tensor is ``[layers, tokens, width]`` (the order
the restore path consumes, one layer after another); a *token-major* tensor is
``[tokens, layers, width]`` (the order some models emit when all layers of a
token are gathered together). Spans are half-open ``[start, end)``; only the
last chunk may be shorter than ``chunk_tokens`` (the ragged tail of a prompt).
"""
from __future__ import annotations

import operator

import torch

DEFAULT_CHUNK_TOKENS = 64

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "n_chunks",
    "chunk_spans",
    "split_into_chunks",
    "join_chunks",
    "token_major_to_layer_major",
    "layer_major_to_token_major",
]


def _check_counts(n_tokens: int, chunk_tokens: int) -> tuple[int, int]:
    n_tokens, chunk_tokens = operator.index(n_tokens), operator.index(chunk_tokens)
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    return n_tokens, chunk_tokens


def n_chunks(n_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """How many chunks cover `n_tokens` tokens (the last one possibly ragged).

    Lets a planner size its reads without materialising the spans.
    """
    n_tokens, chunk_tokens = _check_counts(n_tokens, chunk_tokens)
    return -(-n_tokens // chunk_tokens)


def chunk_spans(n_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[tuple[int, int]]:
    """Half-open ``[start, end)`` token spans of consecutive chunks.

    Spans are ordered, contiguous and cover ``range(n_tokens)`` exactly once;
    every span has `chunk_tokens` tokens except possibly the last.
    ``n_tokens == 0`` gives ``[]``.
    """
    n_tokens, chunk_tokens = _check_counts(n_tokens, chunk_tokens)
    return [(s, min(s + chunk_tokens, n_tokens)) for s in range(0, n_tokens, chunk_tokens)]


def _check_3d(x: torch.Tensor, name: str, dims: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} expects a {dims} tensor, got shape {tuple(x.shape)}")


def split_into_chunks(x: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[list[torch.Tensor]]:
    """Cut a layer-major ``[layers, tokens, width]`` tensor into token chunks.

    ``result[l][c]`` is chunk `c` of layer `l`, shape ``[end - start, width]``
    for the `c`-th span of :func:`chunk_spans`. The chunks are *views* of `x`
    (no copy): they share its memory, and each is contiguous whenever `x` is.
    Callers that keep a chunk beyond `x`'s lifetime, or write to `x`, should
    clone.
    """
    _check_3d(x, "split_into_chunks", "[layers, tokens, width]")
    spans = chunk_spans(x.shape[1], chunk_tokens)
    return [[layer[s:e] for s, e in spans] for layer in x.unbind(0)]


def join_chunks(chunks: list[list[torch.Tensor]]) -> torch.Tensor:
    """Inverse of :func:`split_into_chunks`: a new contiguous ``[layers, tokens, width]`` tensor.

    Chunks of a layer are concatenated in order; every layer must add up to
    the same number of tokens and every chunk must share width, dtype and
    device. The output is allocated once and filled by copies (no
    intermediate per-layer concatenation). Raises ValueError when there is no
    chunk to infer width and dtype from (no layers, or zero tokens).
    """
    template = next((c for layer in chunks for c in layer), None)
    if template is None:
        raise ValueError("join_chunks needs at least one chunk to infer width and dtype")
    if template.dim() != 2:
        raise ValueError(f"chunks must be [tokens, width], got shape {tuple(template.shape)}")
    width = template.shape[1]
    for layer in chunks:
        for c in layer:
            if c.dim() != 2 or c.shape[1] != width or c.dtype != template.dtype or c.device != template.device:
                raise ValueError(
                    f"every chunk must be [tokens, {width}] {template.dtype} on {template.device}; "
                    f"got {tuple(c.shape)} {c.dtype} on {c.device}"
                )
    lengths = {sum(c.shape[0] for c in layer) for layer in chunks}
    if len(lengths) != 1:
        raise ValueError(f"layers hold different token counts: {sorted(lengths)}")
    out = torch.empty((len(chunks), lengths.pop(), width), dtype=template.dtype, device=template.device)
    for dst, layer in zip(out.unbind(0), chunks):
        start = 0
        for c in layer:
            dst[start : start + c.shape[0]].copy_(c)
            start += c.shape[0]
    return out


def _swap_first_two(x: torch.Tensor, name: str, dims: str) -> torch.Tensor:
    _check_3d(x, name, dims)
    # clone, not .contiguous(): the latter returns a view when a size-1 dim makes
    # the transpose contiguous already, and callers may write into the result.
    return x.transpose(0, 1).clone(memory_format=torch.contiguous_format)


def token_major_to_layer_major(x: torch.Tensor) -> torch.Tensor:
    """``[tokens, layers, width]`` -> a new contiguous ``[layers, tokens, width]``.

    Layer-major is what :func:`split_into_chunks` and the layer-by-layer
    restore path expect.
    """
    return _swap_first_two(x, "token_major_to_layer_major", "[tokens, layers, width]")


def layer_major_to_token_major(x: torch.Tensor) -> torch.Tensor:
    """``[layers, tokens, width]`` -> a new contiguous ``[tokens, layers, width]``."""
    return _swap_first_two(x, "layer_major_to_token_major", "[layers, tokens, width]")

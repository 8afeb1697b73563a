"""Process-independent identities: a model's fingerprint and chained prefix hashes.

State is keyed by a hash of the whole token prefix up to and including a chunk,
chained from the model's fingerprint, so (1) any earlier prefix is found again
(the next chat round, a RAG document seen before), (2) two models never share
state, and (3) the keys are the same in every process: hashlib digests of
token bytes, never Python's `hash()` (randomised per process; LMCache #2979).
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Sequence

import numpy as np
import torch

_SAMPLES_PER_TENSOR = 4096
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_internal",
                         "_attn_implementation_autoset", "_attn_implementation", "use_cache", "return_dict",
                         "output_attentions", "output_hidden_states", "torchscript"}


def _config_json(config) -> str:
    d = config.to_dict()
    for k in list(d):
        if k in _VOLATILE_CONFIG_KEYS:
            del d[k]
    return json.dumps(d, sort_keys=True, default=str)


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the model's class, config, parameter dtype and a sample of every weight.

    Hashing all weights of a 7B model would take seconds; a strided sample of
    4096 values per tensor (plus names, shapes and dtypes) tells apart any two
    models that were trained or initialised differently, at a cost of a few
    milliseconds (under tensor parallelism the split weights are gathered once, so
    every degree gets the same fingerprint). Pass `model_id=` to HCache to name a
    model explicitly instead.
    """
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    h.update(_config_json(model.config).encode())
    for name, p in model.state_dict().items():
        if hasattr(p, "full_tensor"):  # a weight split by tensor parallelism: the fingerprint of the whole model,
            p = p.full_tensor()  # the same at every degree (a collective: every rank fingerprints together)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.reshape(-1)
        if flat.numel() == 0:
            continue
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].detach().to("cpu", torch.float32).contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def chunk_digests(
    seed: str, token_ids: Sequence[int] | torch.Tensor | np.ndarray, chunk_tokens: int, *, after: str | None = None
) -> list[str]:
    """Chained digests of each full chunk of `token_ids`: d[c] = H(d[c-1] || tokens of chunk c).

    `after` continues a chain (the digest of the chunk just before `token_ids`);
    otherwise the chain starts from `seed` (the model's fingerprint). The tail
    shorter than a chunk gets no digest (it is recomputed, see HCache).
    """
    if isinstance(token_ids, (list, tuple)):  # hc.generate's host copy of the prompt: struct packs it ~5x faster than numpy
        packed = struct.pack(f"<{len(token_ids)}q", *token_ids)
    elif isinstance(token_ids, torch.Tensor):
        packed = token_ids.detach().reshape(-1).to("cpu", torch.int64).numpy().astype("<i8", copy=False).tobytes()
    else:
        packed = np.asarray(token_ids, dtype=np.int64).reshape(-1).astype("<i8", copy=False).tobytes()
    raw = memoryview(packed)  # one conversion, then slices of it (no copies)
    n = len(packed) // 8
    step = chunk_tokens * 8
    prev = bytes.fromhex(after) if after else hashlib.blake2b(seed.encode(), digest_size=16).digest()
    out = []
    for c in range(n // chunk_tokens):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(raw[c * step : (c + 1) * step])  # H(prev || tokens): the same bytes as one call on their concatenation
        prev = h.digest()
        out.append(prev.hex())
    return out


def manifest_key(namespace: str, digest: str) -> str:
    return f"{namespace}/{digest}/m"


def layer_key(namespace: str, digest: str, kind: str, layer: int) -> str:
    """Key of one layer's state for one chunk; `kind` is "h" (hidden) or "kv"."""
    return f"{namespace}/{digest}/{kind}{layer}"

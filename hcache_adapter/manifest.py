"""The per-chunk manifest: which representation each layer was saved in.

The plan chosen at save time (hidden state, K/V, or nothing because the layer
is recomputed) is stored with the state, so a restore never guesses. A chunk's
manifest is written after all of its layer entries; restore still checks every
entry, because after a crash any subset may be durable. Manifests written
before `kv_shards` existed read as 1 (one process).
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import torch

HIDDEN, KV, RECOMPUTE = "H", "K", "R"
FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    fingerprint: str
    plan: str  # one letter per layer: H, K or R
    chunk_tokens: int
    dtype: str
    format: int = FORMAT
    kv_shards: int = 1  # ranks the K/V layers' heads were split over (tensor parallelism); 1 for H/R-only plans

    def __post_init__(self):
        if set(self.plan) - {HIDDEN, KV, RECOMPUTE}:
            raise ValueError(f"bad plan {self.plan!r}")

    def encode(self) -> torch.Tensor:
        raw = json.dumps(asdict(self), sort_keys=True).encode()
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    @classmethod
    def decode(cls, t: torch.Tensor | None) -> "Manifest | None":
        """None for anything that is not a manifest of this format."""
        if t is None or t.dtype != torch.uint8 or t.dim() != 1:
            return None
        return _decode(bytes(t.cpu().numpy()))


@functools.lru_cache(maxsize=64)
def _decode(raw: bytes) -> Manifest | None:
    """Every chunk of a prefix carries the same manifest: parse it once (instances are frozen)."""
    try:
        d = json.loads(raw.decode())
        if d.get("format") != FORMAT:
            return None
        return Manifest(**d)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None

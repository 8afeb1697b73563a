"""What restoration costs on this machine for this model, measured once and kept.

The scheduler needs four figures: how fast each tier delivers bytes to the
compute device, how long projecting one layer's hidden states takes, how long
recomputing one layer from tokens takes (both as functions of the token count),
and how many bytes a token's state takes per layer. `Profile` holds them and
round-trips through JSON; `measure_profile` (in profiling.py) fills one.

Under tensor parallelism over `tp_world` ranks (hcache_adapter.parallel.profile)
the bytes are those of all ranks together (the whole hidden state, every K/V
shard) and the bandwidths the sum of the ranks' own links, so bytes over
bandwidth is still the time of a layer's reads; a hidden-state layer's compute
adds the all-gather of its shares (`gather_coef`) to its projection.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Profile:
    n_layers: int
    hidden_bytes_per_token: int  # one layer
    kv_bytes_per_token: int  # one layer, K and V
    read_bytes_per_s: dict[str, float]  # tier -> bytes/s into the compute device
    project_coef: tuple[float, float]  # one layer's projection: a + b*n seconds
    recompute_coef: tuple[float, float, float]  # one layer's recomputation: a + b*n + c*n^2 seconds
    device: str = "cpu"
    dtype: str = "float32"
    notes: dict = field(default_factory=dict)
    # Host-side costs (a launch-bound GPU host), measured on CUDA; 0 elsewhere and in older profiles:
    host_key_s: float = 0.0  # issuing the read of one chunk key from a memory tier
    host_layer_s: float = 0.0  # issuing one restored layer's copy and projection (events, graph replay)
    forward_host_s: float = 0.0  # issuing one eager forward of a few new tokens (kernel launches)
    captured_forward_s: float = 0.0  # GPU time of that forward replayed from a CUDA graph (0: not captured)
    # Tensor parallelism (1 and no cost for one process, and in older profiles):
    tp_world: int = 1
    gather_coef: tuple[float, float] = (0.0, 0.0)  # one layer's all-gather of n tokens' hidden state: a + b*n s

    def project_seconds(self, n: int) -> float:
        """One hidden-state layer's work between its read and its K/V: the all-gather of the ranks' shares
        (tensor parallelism) and the projection."""
        a, b = self.project_coef
        return max(0.0, a + b * n) + self.gather_seconds(n)

    def gather_seconds(self, n: int) -> float:
        a, b = self.gather_coef
        return max(0.0, a + b * n) if self.tp_world > 1 else 0.0

    def recompute_seconds(self, n: int) -> float:
        a, b, c = self.recompute_coef
        return max(0.0, a + b * n + c * n * n)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        d = json.loads(text)
        d["project_coef"] = tuple(d["project_coef"])
        d["recompute_coef"] = tuple(d["recompute_coef"])
        if "gather_coef" in d:
            d["gather_coef"] = tuple(d["gather_coef"])
        return cls(**d)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Profile | None":
        try:
            return cls.from_json(Path(path).read_text())
        except (OSError, ValueError, TypeError, KeyError):
            return None


def fit_linear(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b*n through (n, seconds) points."""
    import numpy as np

    n = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    if len(points) == 1:
        return 0.0, float(t[0] / n[0])
    b, a = np.polyfit(n, t, 1)
    return float(a), float(b)


def fit_quadratic(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least-squares a + b*n + c*n^2 (c >= 0: attention's cost never shrinks with length)."""
    import numpy as np

    if len(points) < 3:
        a, b = fit_linear(points)
        return a, b, 0.0
    n = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    c, b, a = np.polyfit(n, t, 2)
    if c < 0:
        a, b = fit_linear(points)
        c = 0.0
    return float(a), float(b), float(c)

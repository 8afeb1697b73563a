"""Cutting a layer's query projection to one head while its K/V are projected.

The generic projection runs the attention's own code, which computes the
query too: for a Llama-style layer one more GEMM as large as K and V together
(MHA).  Where the query has its own Linear (``q_proj``, ``query``, ``q_b_proj``,
``wq``, ...) and the attention only views its output as ``(..., -1, head_dim)``,
a Linear of the first head's rows gives a one-head query the rest of the code
handles as well (rotary, q-norm), and the layer reaches its cache write with
1/H of the query's work.  The query never reaches K or V, but that is checked,
not assumed: `GenericProjector.adopt_query_slice` keeps a slice only when the
projected K/V are bit for bit those without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

QUERY_NAMES = ("q_proj", "query", "q_b_proj", "wq", "q", "query_proj", "to_q")
HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")


@dataclass
class QuerySlice:
    """The query Linear `owner.<name>` cut to its first `rows` outputs (one head) while a layer is projected."""

    owner: nn.Module
    name: str
    rows: int
    _slice: "RowSlice | None" = field(default=None, repr=False, compare=False)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        full = getattr(self.owner, self.name)
        if self._slice is None or self._slice.linear is not full:  # made once: building a module costs more
            self._slice = RowSlice(full, self.rows)                  # than its forward here
        setattr(self.owner, self.name, self._slice)
        try:
            yield
        finally:
            setattr(self.owner, self.name, full)


class RowSlice(nn.Module):
    """The first `rows` output features of a Linear (views of its weight and bias, no copy)."""

    def __init__(self, linear: nn.Linear, rows: int) -> None:
        super().__init__()
        self.linear = linear
        self.rows = rows

    def forward(self, x: Tensor) -> Tensor:
        bias = self.linear.bias
        return nn.functional.linear(x, self.linear.weight[: self.rows], None if bias is None else bias[: self.rows])


def _head_count(owner: nn.Module, config: Any) -> int | None:
    for name in HEAD_COUNT_NAMES:
        value = getattr(owner, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(config, "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else None


def query_slices(layer: nn.Module, config: Any) -> list[QuerySlice]:
    """Candidate one-head slices of `layer`'s query Linears (plain nn.Linear only), most likely first."""
    found = []
    for _, owner in layer.named_modules():
        children = dict(owner.named_children())
        for name in QUERY_NAMES:
            linear = children.get(name)
            if type(linear) is not nn.Linear:
                continue
            heads = _head_count(owner, config)
            if heads and heads > 1 and linear.out_features % heads == 0:
                found.append(QuerySlice(owner, name, linear.out_features // heads))
    return found

"""Where each row of a left-padded batch starts, and how much of it one shared cache can hold.

A decoder-only batch is left padded: row b is `pad_b` masked columns and then
its `length_b` real tokens, all rows ending in the same column T - 1. A cache
handed to generate() holds the first P columns of every row. For row b those
are `pad_b` padding columns (masked: their K/V never reach a real token) and
then the row's first `P - pad_b` real tokens, computed for the row alone.

P is chosen as the column where the longest row's whole-chunk prefix ends
(`shared_columns`): every stored chunk of every row then fits under it, and
what a row lacks up to P is computed for that row, unpadded, which is the only
computation its state may be saved from. The columns P.. (at most one chunk
of the longest row, plus padding) are left to generate()'s batched prefill.
Pure arithmetic, property-tested.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RowSpan:
    """One row of a left-padded batch: `pad` masked columns, then `length` real tokens."""

    pad: int
    length: int
    chunk_tokens: int

    @property
    def whole(self) -> int:
        """Tokens in the row's whole chunks that leave at least one token to run (what may be restored)."""
        return max(self.length - 1, 0) // self.chunk_tokens * self.chunk_tokens

    def held(self, columns: int) -> int:
        """Real tokens of this row among the first `columns` columns."""
        return max(0, columns - self.pad)


def left_padding(mask_rows: Sequence[Sequence[int]]) -> list[int] | None:
    """Per row, the number of leading masked columns; None unless every row is zeros then ones, with a one."""
    pads = []
    for row in mask_rows:
        pad = 0
        while pad < len(row) and not row[pad]:
            pad += 1
        if pad == len(row) or not all(row[pad:]):
            return None
        pads.append(pad)
    return pads


def row_spans(pads: Sequence[int], columns: int, chunk_tokens: int) -> list[RowSpan]:
    """The spans of a batch `columns` wide with these left paddings."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    spans = []
    for pad in pads:
        if not 0 <= pad < columns:
            raise ValueError(f"a row of {columns} columns cannot have {pad} padding columns")
        spans.append(RowSpan(pad, columns - pad, chunk_tokens))
    return spans


def shared_columns(spans: Sequence[RowSpan]) -> int:
    """P: the columns the cache handed to generate() holds, where the longest whole-chunk prefix ends.

    At most T - 1 (generate() runs at least the last column) and never short of
    any row's whole chunks.
    """
    return max((s.pad + s.whole for s in spans), default=0)

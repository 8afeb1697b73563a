"""Pure layout math of the chunk store: chunking, packing, striping.

Nothing here does I/O or knows about tiers; each module holds one concern:

- `chunks`: token chunk spans, layer-major split/join, token/layer-major swaps.
- `packing`: aligned placement of records in one extent; pack/unpack tensors.
- `striping`: round-robin assignment of items to devices (the NVMe tier's placement).
- `packing` also merges back-to-back records into vectored I/O ops (the NVMe tier's batching).
"""
from __future__ import annotations

from hstore.layout import chunks, packing, striping
from hstore.layout.chunks import (
    DEFAULT_CHUNK_TOKENS,
    chunk_spans,
    join_chunks,
    layer_major_to_token_major,
    n_chunks,
    split_into_chunks,
    token_major_to_layer_major,
)
from hstore.layout.packing import Extent, cut_by_size, merge_adjacent, pack_chunks, pack_layout, unpack_chunks
from hstore.layout.striping import assign_round_robin, next_round_robin

# Each module's __all__ is its public API; the package exports their union.
__all__ = [*chunks.__all__, *packing.__all__, *striping.__all__]

"""How much of a memory-tier restore is queued before generate()'s first forward (`layers_ahead`)."""
from __future__ import annotations

import pytest

from hcache_adapter.loader import LayerRead
from hcache_adapter.prefix_source import layers_ahead
from hcache_adapter.restore import ISSUE_AHEAD_BYTES, Restorer


def _reads(layers: int, chunks: int, chunk_shape=(64, 4096)) -> list[LayerRead]:
    return [LayerRead(l, "H", [f"l{l}/c{c}" for c in range(chunks)], chunk_shape) for l in range(layers)]


def test_whole_layers_fit_the_budget_and_at_least_one_is_queued():
    reads = _reads(32, 64)  # the 7B shape at 4K: 32 MiB of float16 hidden states per layer
    layer = 64 * 64 * 4096 * 2
    assert layers_ahead(reads, 10 * layer, 2) == 10
    assert layers_ahead(reads, 10 * layer + 1, 2) == 10
    assert layers_ahead(reads, 10 * layer - 1, 2) == 9
    assert layers_ahead(reads, 1, 2) == 1
    assert layers_ahead(reads, 1 << 50, 2) == 32
    assert layers_ahead([], 1 << 30, 2) == 1


def test_the_default_budget_queues_a_few_layers_ahead_and_a_short_restore_at_once():
    """256 MiB: 8 of the 7B shape's 4K layers, 2 of its 16K ones, every layer of a 1K restore."""
    assert layers_ahead(_reads(32, 64), ISSUE_AHEAD_BYTES, 2) == 8
    assert layers_ahead(_reads(32, 256), ISSUE_AHEAD_BYTES, 2) == 2
    assert layers_ahead(_reads(32, 16), ISSUE_AHEAD_BYTES, 2) == 32


def test_a_non_positive_budget_is_refused():
    with pytest.raises(ValueError, match="issue_ahead_bytes"):
        Restorer(None, None, None, None, "cpu", issue_ahead_bytes=0)

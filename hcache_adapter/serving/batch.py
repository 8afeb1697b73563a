"""Batched generate(): every row of a left-padded batch starts from its own stored prefix.

`hc.generate(input_ids [B, T], attention_mask=...)` must give exactly what
`model.generate` gives for the same batch, and may save a row's state only
from a computation of that row's tokens alone: under left padding the model
takes positions from the mask's cumsum and masks the padding, which is the
same arithmetic but not the same computation, and a stored chunk is keyed by
the digests of the row's real tokens only. So, per row (see `rows`):

1. the row's longest prefix is taken from the GPU-resident contexts or
   restored from the store (a batch-1 restore of the row's real tokens);
2. what the row lacks up to the shared column P is computed for that row
   alone, unpadded, saving every whole chunk it completes (the only state of
   the request that is saved), and the row's whole-chunk prefix becomes
   resident;
3. the rows are laid side by side in the left-padded layout (padding columns
   hold zeros: masked, they contribute exactly nothing) and generate() runs the
   rest, columns P.. and the decoding, as one batch.

Rows are done one after the other, so a row finds what an earlier row of the
same batch saved (identical rows, questions on one document). The decoding of
a batch is computed under padding: it is neither saved nor made resident,
except for a batch of one unpadded row, whose whole context (prompt and
output) stays resident. Beams and return sequences repeat the merged cache.

"recompute" with resident contexts comes here for single rows too (nothing is
saved, so generate()'s own prefill over the resident prefix does it in one pass).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable

import torch

from hcache_adapter.compat import cache_kwarg, fill_layer, generate_positions, layer_kv, new_cache
from hcache_adapter.generation import GenerateCall, cache_for_call, with_cache
from hcache_adapter.layout import StateLayout
from hcache_adapter.restore import RestoreResult
from hcache_adapter.serving.resident import ResidentContexts, admit_generated
from hcache_adapter.serving.rows import RowSpan, row_spans, shared_columns
from hcache_adapter.serving.stats import ServingStats

log = logging.getLogger(__name__)

RowRestore = Callable[[torch.Tensor, list[int]], RestoreResult]  # (row ids [1, n] on the device, host ids) -> lazy
SaverFor = Callable[[RestoreResult, Any, list[int]], Any]  # (result, cache, host ids) -> StateSaver


class BatchedGenerator:
    """Serves generate() calls of left-padded batches (and of single rows with left padding)."""

    def __init__(self, model: torch.nn.Module, layout: StateLayout, *, restore_row: RowRestore | None,
                 saver_for: SaverFor | None, resident: ResidentContexts | None, stats: ServingStats):
        """`restore_row`/`saver_for`: None when nothing is stored ("recompute"): rows then start from
        the resident contexts or from nothing, and nothing is saved."""
        self.model = model
        self.layout = layout
        self.restore_row = restore_row
        self.saver_for = saver_for
        self.resident = resident
        self.stats = stats
        self.num_layers = layout.num_layers
        self._cache_kw = cache_kwarg(model)
        self._base_cache_kw = cache_kwarg(model.base_model)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, kwargs: dict, call: GenerateCall):
        device = next(self.model.parameters()).device
        pads = call.pads if call.pads is not None else (0,) * input_ids.shape[0]
        spans = row_spans(pads, input_ids.shape[1], self.layout.chunk_tokens)
        P = shared_columns(spans)
        if P == 0:  # no row has a whole chunk: nothing to restore or save
            return self._finish(input_ids, kwargs, call, None, pads)
        if input_ids.shape[0] == 1 and pads[0] == 0 and self.saver_for is None:
            # one unpadded row and nothing to save ("recompute" with resident contexts): generate()'s own
            # prefill computes the rest, in one pass
            result = self._start(input_ids.to(device), input_ids[0].tolist())
            try:
                return self._finish(input_ids, kwargs, call, cache_for_call(call, self.model, result.cache), pads)
            finally:
                result.close()
        ids = input_ids.to(device)
        rows = input_ids.tolist()
        states: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = []
        for b, span in enumerate(spans):
            held = span.held(P)
            kv = self._row_state(ids[b:b + 1, span.pad:], rows[b][span.pad:], held) if held else None
            if held and kv is None:
                log.warning("hc.generate: a row's cache does not keep every position (sliding window?); the batch "
                            "runs from tokens")
                return self._finish(input_ids, kwargs, call, None, pads)
            states.append(kv)
        cache = merge_rows(new_cache(self.model), states, spans, P)
        return self._finish(input_ids, kwargs, call, cache_for_call(call, self.model, cache), pads)

    def _finish(self, input_ids: torch.Tensor, kwargs: dict, call: GenerateCall, cache, pads):
        # one row, no padding: its decoding is an unpadded computation too, and its whole context stays resident
        keep = (self.resident is not None and input_ids.shape[0] == 1 and pads[0] == 0 and call.expand == 1
                and not call.speculative)
        if cache is None and keep:
            cache = cache_for_call(call, self.model, new_cache(self.model))
        if cache is None:
            return self.model.generate(input_ids, **kwargs)
        with with_cache(self.model, kwargs, self._cache_kw, cache) as kw:
            out = self.model.generate(input_ids, **kw)
        if keep:
            admit_generated(self.resident, out, cache, self.num_layers, next(self.model.parameters()).device)
        return out

    def _row_state(self, row_ids: torch.Tensor, tokens: list[int], held: int):
        """K/V of the row's first `held` tokens, computed for the row alone; its new whole chunks saved."""
        result = self._start(row_ids, tokens)
        try:
            cache, start = result.cache, result.tokens
            if held > start:
                saver = self.saver_for(result, cache, tokens) if self.saver_for is not None else nullcontext()
                with saver:
                    self.model.base_model(input_ids=row_ids[:, start:held], use_cache=True,
                                          **generate_positions(self.model, start, held, row_ids.device),
                                          **{self._base_cache_kw: cache})
                self.stats.row_prefill_tokens += held - start
            kv = [layer_kv(cache, l) for l in range(self.num_layers)]
            if any(x is None or x[0].shape[-2] != held or x[1].shape[-2] != held for x in kv):
                return None
            if self.resident is not None:
                self.resident.admit(tokens, kv, held)
            return kv
        finally:
            result.close()

    def _start(self, row_ids: torch.Tensor, tokens: list[int]) -> RestoreResult:
        if self.restore_row is not None:
            return self.restore_row(row_ids, tokens)
        hit = self.resident.restore(tokens, lazy=True) if self.resident is not None else None
        return hit if hit is not None else RestoreResult(new_cache(self.model))


def merge_rows(cache, states: list, spans: list[RowSpan], columns: int):
    """Fill `cache` with the rows' K/V in the left-padded layout: row b's tokens end in column `columns` - 1,
    its padding columns hold zeros (masked). `states[b]`: per layer (K, V) [1, heads, held, head_dim] or None."""
    proto = next(s for s in states if s is not None)
    B = len(states)
    for l, (pk, pv) in enumerate(proto):
        k = pk.new_zeros(B, pk.shape[1], columns, pk.shape[-1])
        v = pv.new_zeros(B, pv.shape[1], columns, pv.shape[-1])
        for b, (state, span) in enumerate(zip(states, spans)):
            if state is not None:
                k[b, :, span.pad:].copy_(state[l][0][0])
                v[b, :, span.pad:].copy_(state[l][1][0])
        fill_layer(cache, l, k, v)
    return cache

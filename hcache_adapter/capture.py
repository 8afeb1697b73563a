"""Saving while generate() runs: hooks that capture each layer's state per token.

A forward pre-hook on the input embedding records the token ids fed at each
step; a pre-hook on every decoder layer saved as hidden state ("H") keeps that
layer's input; a post-hook on every layer saved as K/V ("K") reads what the
layer just appended to the cache. Whenever a layer has a whole chunk of tokens,
the chunk goes to the store at once (on a GPU: an asynchronous copy into pinned
DRAM on a side stream; the store's flusher then writes it to NVMe): the two-stage
save, so decoding never waits for storage. The manifest of a chunk is written
after the last layer has put its part. Nothing here changes any tensor the
model computes.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from hcache_adapter.compat import layer_kv
from hcache_adapter.keys import chunk_digests, layer_key, manifest_key
from hcache_adapter.manifest import HIDDEN, KV, Manifest

if TYPE_CHECKING:
    from hcache_adapter.hcache import HCache

log = logging.getLogger(__name__)


class StateSaver:
    """Captures state for positions >= `start` (a chunk boundary) and puts every completed chunk."""

    def __init__(self, hc: "HCache", plan: str, start: int, cache, prefix_digest: str | None, stored_chunks: int = 0):
        """`stored_chunks`: leading chunks already in the store (restored by recomputation): not put again."""
        self.hc = hc
        self.plan = plan
        self.C = hc.chunk_tokens
        if start % self.C:
            raise ValueError("capture must start on a chunk boundary")
        self.start = start
        self.cache = cache
        self.next_pos = start  # position of the next token fed to the model
        self._ids: list[torch.Tensor] = []  # token ids fed since `start`, as given (maybe on GPU)
        self._ids_cpu: list[int] = []
        self._prefix_digest = prefix_digest  # digest of the chunk ending at `start` (None at 0)
        self._pending: dict[int, list[torch.Tensor]] = {l: [] for l, k in enumerate(plan) if k == HIDDEN}
        self._pending_start: dict[int, int] = {l: start for l in self._pending}
        self._pending_end: dict[int, int] = dict(self._pending_start)  # position after the last pending row
        dtype = str(hc.dtype).replace("torch.", "")
        self._manifest = Manifest(hc.fingerprint, plan, self.C, dtype).encode()
        self._kv_saved: dict[int, int] = {l: start // self.C for l, k in enumerate(plan) if k == KV}
        self._manifests_done = max(start // self.C, stored_chunks)
        self._stored_chunks = stored_chunks
        self._digests: list[str] = []
        self._handles = []
        self.enabled = True
        self.chunks_saved = 0
        self.bytes_saved = 0

    # -- lifetime --------------------------------------------------------------
    def __enter__(self) -> "StateSaver":
        layers = self.hc.decoder_layers
        self._handles.append(self.hc.model.get_input_embeddings().register_forward_pre_hook(self._on_embed))
        for l, kind in enumerate(self.plan):
            if kind == HIDDEN:
                self._handles.append(layers[l].register_forward_pre_hook(self._hidden_hook(l), with_kwargs=True))
            elif kind == KV:
                self._handles.append(layers[l].register_forward_hook(self._kv_hook(l)))
        self._handles.append(layers[-1].register_forward_hook(self._on_last_layer))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _disable(self, why: str) -> None:
        if self.enabled:
            log.warning("HCache stops saving state for this call: %s", why)
        self.enabled = False

    # -- hooks -------------------------------------------------------------------
    def _on_embed(self, module, args):
        if not self.enabled:
            return
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return self._disable("the model was not called with input_ids")
        if ids.shape[0] != 1:
            return self._disable(f"batch of {ids.shape[0]} sequences (save/restore handles one)")
        self._ids.append(ids)  # [1, T]; generate runs under no_grad: nothing to detach
        self._step_tokens = ids.shape[1]

    def _hidden_hook(self, layer: int):
        # Runs for every layer at every decoding step: keep it to a few attribute reads.
        pending, C = self._pending[layer], self.C
        pending_end = self._pending_end

        def hook(module, args, kwargs):
            if not self.enabled:
                return
            h = args[0] if args else kwargs.get("hidden_states")
            if h is None or h.dim() != 3 or h.shape[0] != 1 or h.shape[1] != self._step_tokens:
                return self._disable(f"unexpected hidden state at layer {layer}")
            pending.append(h)  # [1, T, D], kept by reference: the model does not write it in place
            end = pending_end[layer] = pending_end[layer] + h.shape[1]
            if end % C and end // C == (end - h.shape[1]) // C:
                return  # no chunk completed by this step
            self._flush_hidden(layer)

        return hook

    def _flush_hidden(self, layer: int) -> None:
        """Put every whole chunk among `layer`'s pending rows; keep the rest pending."""
        pending = self._pending[layer]
        have = self._pending_end[layer]
        done = (have // self.C) * self.C
        if done > self._pending_start[layer]:
            rows = (torch.cat(pending, dim=1) if len(pending) > 1 else pending[0])[0]
            first = self._pending_start[layer]
            self._put([(layer_key(self.hc.namespace, self._digest(a // self.C), "h", layer), rows[a - first : a - first + self.C])
                       for a in range(first, done, self.C) if a // self.C >= self._stored_chunks])
            rest = rows[done - first :]
            pending.clear()
            if rest.shape[0]:
                pending.append(rest.unsqueeze(0))
            self._pending_start[layer] = done

    def _kv_hook(self, layer: int):
        def hook(module, args, output):
            if not self.enabled:
                return
            end = self.next_pos + self._step_tokens
            kv = layer_kv(self.cache, layer)
            c = self._kv_saved[layer]
            items = []
            while (c + 1) * self.C <= end:
                if kv is None or kv[0].shape[0] != 1 or kv[0].shape[-2] < (c + 1) * self.C:
                    return self._disable(f"layer {layer} does not keep the K/V of every position (sliding window?)")
                if c >= self._stored_chunks:
                    k, v = kv
                    chunk = torch.stack([k[0, :, c * self.C : (c + 1) * self.C], v[0, :, c * self.C : (c + 1) * self.C]])
                    items.append((layer_key(self.hc.namespace, self._digest(c), "kv", layer), chunk))
                c += 1
            self._put(items)
            self._kv_saved[layer] = c

        return hook

    def _on_last_layer(self, module, args, output):
        if not self.enabled:
            return
        self.next_pos += self._step_tokens
        complete = self.next_pos // self.C
        if complete <= self._manifests_done:
            return
        new = range(self._manifests_done, complete)
        self._put([(manifest_key(self.hc.namespace, self._digest(c)), self._manifest) for c in new], count=False)
        if self.enabled:
            self.chunks_saved += len(new)
        self._manifests_done = max(self._manifests_done, complete)

    # -- helpers -----------------------------------------------------------------
    def _digest(self, chunk: int) -> str:
        """Digest of chunk `chunk` (absolute index), from the prefix digests plus the ids seen so far."""
        idx = chunk - self.start // self.C
        if idx >= len(self._digests):
            # Every whole chunk fed so far at once: one device-to-host sync per forward, not per chunk.
            self._ids_cpu = torch.cat(self._ids, dim=1)[0].tolist()
            done = len(self._digests) * self.C
            after = self._digests[-1] if self._digests else self._prefix_digest
            self._digests += self.hc.digests(self._ids_cpu[done:], after=after)
        return self._digests[idx]

    def _put(self, items: list[tuple[str, torch.Tensor]], *, count: bool = True) -> None:
        if not self.enabled or not items:
            return
        try:
            self.hc.store.put_many(items, non_blocking=items[0][1].is_cuda)
        except Exception as e:  # never let storage trouble break generation
            self._disable(f"store.put failed: {e}")
            return
        if count:
            self.bytes_saved += sum(v.numel() * v.element_size() for _, v in items)

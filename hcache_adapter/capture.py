"""StateSaver: save each layer's state per token while generate() runs.

A forward pre-hook on the input embedding records the token ids fed at each
step; a pre-hook on every decoder layer saved as hidden state ("H") keeps that
layer's input; a post-hook on every layer saved as K/V ("K") reads what the
layer just appended to the cache. Whenever a layer has a whole chunk of tokens,
the chunk goes to the store at once (on a GPU: an asynchronous copy into pinned
DRAM on a side stream; the store's flusher then writes it to NVMe): the
two-stage save, so decoding never waits for storage. A chunk's manifest is put
after the last layer has put its part. Under tensor parallelism (the layout's
`shard`) each rank puts its own K/V heads and the hidden-state chunks it owns.
Nothing here changes a tensor the model computes.

A forward that does not call the hooks (a replayed CUDA graph of the prefill)
hands the same inputs over with `step()`. Forward passes HCache runs for itself
(recomputation, `internal.active`) are ignored.

The "hooks" are by default the modules' own `forward` wrapped for the call
(`wrap_forward`): a registered forward hook sends every call of its module through
torch's hook dispatch, where a wrapper costs a Python call or two. On this
repository's CPU machine a 32-layer decoding step (~30 ms, mostly host work, as on
the lent GPU) took +0.8-1.1 ms with the saver's hooks and +0.2-0.4 ms with its
wrappers (`benchmarks/saver_watch_cost.py --steps 1500`). A call whose decode
transformers may compile (a static cache) keeps registered hooks, the form
torch.compile is known to trace.
"""
from __future__ import annotations

import logging

import torch

from hcache_adapter.compat import layer_kv
from hcache_adapter.forwards import own_forward, put_back_forward
from hcache_adapter.layout import StateLayout
from hcache_adapter.manifest import HIDDEN, KV

log = logging.getLogger(__name__)


class StateSaver:
    """Captures state for positions >= `start` (a chunk boundary) and puts every completed chunk."""

    def __init__(self, layout: StateLayout, store, plan: str, *, start: int, cache, prefix_digest: str | None,
                 stored_chunks: int = 0, decoder_layers=None, embeddings=None, internal=None, prefill_rows: int = 1,
                 prefill_only: bool = False, limit: int | None = None, prompt: list[int] | None = None,
                 wrap_forward: bool = True):
        """`stored_chunks`: leading chunks already in the store (left to the prefill): not put again.
        `decoder_layers`/`embeddings`: the modules to hook (None: the caller feeds `step()` itself).
        `prefill_rows`: rows of the first step that repeat one prompt (beams): its first row is saved.
        `prefill_only`: save what the first step completes and nothing after it (beams that diverge,
        draft tokens that may be rolled back). `limit`: no chunk reaching past this position is saved
        (the prompt's end, when the first step also feeds draft tokens). `prompt`: the request's token
        ids on the host, so the prompt's chunk digests need no device-to-host copy. `wrap_forward`: watch the
        modules by wrapping their `forward` for the call (False: registered forward hooks; see the module doc)."""
        self.layout = layout
        self.store = store
        self.plan = plan
        self.C = layout.chunk_tokens
        if start % self.C:
            raise ValueError("capture must start on a chunk boundary")
        self.start = start
        self.cache = cache
        self.next_pos = start  # position of the next token fed to the model
        self._ids: list[torch.Tensor] = []  # token ids fed since `start`, as given (maybe on GPU)
        self._prefix_digest = prefix_digest  # digest of the chunk ending at `start` (None at 0)
        self._pending: dict[int, list[torch.Tensor]] = {l: [] for l, k in enumerate(plan) if k == HIDDEN}
        # All H layers receive the same tokens each step, so one span describes every layer's pending rows.
        self._hidden_start = start  # position of the first pending row
        self._hidden_end = start  # position after the last pending row
        self._recording = False  # the current step's hidden states are being kept
        self._manifest = layout.manifest(plan).encode()
        self._kv_saved: dict[int, int] = {l: start // self.C for l, k in enumerate(plan) if k == KV}
        self._manifests_done = max(start // self.C, stored_chunks)
        self._stored_chunks = stored_chunks
        self._digests: list[str] = []
        self._prompt = prompt
        self._decoder_layers = decoder_layers
        self._embeddings = embeddings
        self._internal = internal if internal is not None else _NotInternal()
        self._handles = []
        self._wrap_forward = wrap_forward
        self._step_tokens = 0
        self._prefill_rows = prefill_rows
        self._prefill_only = prefill_only
        self._limit_chunks = None if limit is None else limit // self.C  # chunks at or past this one are not saved
        self._row = None  # index of the one row saved from a step of several (the prefill of beams)
        self._steps = 0
        self.enabled = True
        self.chunks_saved = 0
        self.bytes_saved = 0

    # -- lifetime --------------------------------------------------------------
    def __enter__(self) -> "StateSaver":
        if self._embeddings is not None:
            self._watch(self._embeddings, before=lambda module, args, kwargs: self._on_embed(module, args))
        if self._decoder_layers is not None:
            layers = self._decoder_layers
            last = len(layers) - 1
            for l, layer in enumerate(layers):
                kind = self.plan[l] if l < len(self.plan) else None
                kv = self._kv_hook(l) if kind == KV else None
                if l == last:
                    after = self._on_last_layer if kv is None else _both(kv, self._on_last_layer)
                else:
                    after = kv
                before = self._hidden_hook(l) if kind == HIDDEN else None
                if before is not None or after is not None:
                    self._watch(layer, before=before, after=after)
        return self

    def __exit__(self, *exc) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()

    def _watch(self, module: torch.nn.Module, before=None, after=None) -> None:
        """Call `before(module, args, kwargs)` ahead of each forward of `module` and `after(module, args,
        output)` behind it, until the saver exits (a wrapped `forward`, or registered hooks)."""
        if self._wrap_forward:
            self._handles.append(_ForwardWrapper(module, before, after))
            return
        if before is not None:
            self._handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        if after is not None:
            self._handles.append(module.register_forward_hook(after))

    def _disable(self, why: str) -> None:
        if self.enabled:
            log.warning("HCache stops saving state for this call: %s", why)
        self.enabled = False

    def _watching(self) -> bool:
        return self.enabled and not self._internal.active

    # -- one step, fed from outside the hooks ------------------------------------------
    def step(self, ids: torch.Tensor, hidden: dict[int, torch.Tensor]) -> None:
        """Everything the hooks would have seen for one forward of `ids` ([1, T]): the input hidden
        state of every H layer ([1, T, D], not aliased by anything that changes later); K/V layers
        are read from the cache, which must already hold this step's K/V."""
        if not self._begin_step(ids):
            return
        for l, pending in self._pending.items():
            pending.append(hidden[l])
        for l in self._kv_saved:
            self._save_kv(l)
        self._end_step()

    # -- hooks -------------------------------------------------------------------
    def _on_embed(self, module, args):
        if self._watching():
            self._recording = self._begin_step(args[0] if args else None)

    def _hidden_hook(self, layer: int):
        # Runs for every layer at every decoding step: one append. The rows are checked and cut into
        # chunks once per step, after the last layer (`_end_step`), and only when a chunk is complete.
        pending, internal = self._pending[layer], self._internal

        def hook(module, args, kwargs):
            if self._recording and not internal.active:
                pending.append(args[0] if args else kwargs.get("hidden_states"))

        return hook

    def _kv_hook(self, layer: int):
        def hook(module, args, output):
            if self._watching():
                self._save_kv(layer)

        return hook

    def _on_last_layer(self, module, args, output):
        if self._watching() and self._recording:
            self._end_step()
        self._recording = False

    # -- the work ----------------------------------------------------------------
    def _begin_step(self, ids) -> bool:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            self._disable("the model was not called with input_ids")
            return False
        self._row = None
        if self._prefill_only and self._steps > 0:
            self.enabled = False  # what the prompt held is saved; what follows may diverge or be rolled back
            return False
        if ids.shape[0] != 1:
            if self._steps == 0 and ids.shape[0] == self._prefill_rows:
                self._row = slice(0, 1)  # the prompt, repeated per beam: one row says it all
            else:
                self._disable(f"batch of {ids.shape[0]} sequences (save/restore handles one)")
                return False
            ids = ids[self._row]
        self._steps += 1
        self._ids.append(ids)  # [1, T]; generate runs under no_grad: nothing to detach
        self._step_tokens = ids.shape[1]
        return True

    def _end_hidden(self) -> bool:
        """After a step: when its rows complete a chunk, check every H layer's pending rows and put the
        whole chunks (False when a layer's rows are not what the step fed: saving stops)."""
        T = self._step_tokens
        end = self._hidden_end = self._hidden_end + T
        if not self._pending or (end % self.C and end // self.C == (end - T) // self.C):
            return True  # no chunk completed by this step
        first = self._hidden_start
        done = (end // self.C) * self.C
        if self._limit_chunks is not None:
            done = min(done, self._limit_chunks * self.C)
        rows = {}
        for l, pending in self._pending.items():
            if any(h is None or h.dim() < 3 for h in pending):
                self._disable(f"unexpected hidden state at layer {l}")
                return False
            # beams: the prompt's first row; several streams per token (hyper-connections): one flat row
            kept = [(h if h.shape[0] == 1 else h[:1]).flatten(2) for h in pending]
            if sum(h.shape[1] for h in kept) != end - first:
                self._disable(f"layer {l} did not see every token of the step")
                return False
            rows[l] = (torch.cat(kept, dim=1) if len(kept) > 1 else kept[0])[0]
        if done > first:
            for l, r in rows.items():
                self._put_hidden(l, r, first, done)
            if not self.enabled:
                return False
        for l, r in rows.items():
            rest = r[done - first:].clone() if done > first else r  # a copy: the step's whole tensor can go
            self._pending[l][:] = [rest.unsqueeze(0)] if rest.shape[0] else []
        self._hidden_start = max(first, done)
        return True

    def _put_hidden(self, layer: int, rows: torch.Tensor, first: int, done: int) -> None:
        """Put the whole chunks [first, done) of `layer`'s rows (those not stored yet, and this rank's)."""
        shard = self.layout.shard  # tensor parallelism: every rank sees this hidden state; one of them saves it
        self._put([(self.layout.chunk_key(self._digest(a // self.C), HIDDEN, layer), rows[a - first: a - first + self.C])
                   for a in range(first, done, self.C) if a // self.C >= self._stored_chunks
                   and (shard is None or shard.owns_chunk(a // self.C))])

    def _save_kv(self, layer: int) -> None:
        end = self.next_pos + self._step_tokens
        if self._limit_chunks is not None:
            end = min(end, self._limit_chunks * self.C)
        kv = layer_kv(self.cache, layer)
        if kv is not None and self._row is not None:
            kv = (kv[0][self._row], kv[1][self._row])
        c = self._kv_saved[layer]
        items = []
        while (c + 1) * self.C <= end:
            if kv is None or kv[0].shape[0] != 1 or kv[0].shape[-2] < (c + 1) * self.C:
                self._disable(f"layer {layer} does not keep the K/V of every position (sliding window?)")
                return
            if c >= self._stored_chunks:
                k, v = kv
                chunk = torch.stack([k[0, :, c * self.C: (c + 1) * self.C], v[0, :, c * self.C: (c + 1) * self.C]])
                items.append((self.layout.chunk_key(self._digest(c), KV, layer), chunk))
            c += 1
        self._put(items)
        self._kv_saved[layer] = c

    def _end_step(self) -> None:
        if not self._end_hidden():
            return
        self.next_pos += self._step_tokens
        complete = self.next_pos // self.C
        if self._limit_chunks is not None:
            complete = min(complete, self._limit_chunks)
        if complete <= self._manifests_done:
            return
        new = range(self._manifests_done, complete)
        self._put([(self.layout.manifest_key(self._digest(c)), self._manifest) for c in new], count=False)
        if self.enabled:
            self.chunks_saved += len(new)
        self._manifests_done = max(self._manifests_done, complete)

    # -- helpers -----------------------------------------------------------------
    def _digest(self, chunk: int) -> str:
        """Digest of chunk `chunk` (absolute index), from the prefix digest plus the ids seen so far."""
        idx = chunk - self.start // self.C
        if idx >= len(self._digests):
            if self._prompt is not None and (chunk + 1) * self.C <= len(self._prompt):
                ids = self._prompt[self.start:]
            else:  # every whole chunk fed so far at once: one device-to-host sync per forward, not per chunk
                ids = torch.cat(self._ids, dim=1)[0].tolist()
            done = len(self._digests) * self.C
            after = self._digests[-1] if self._digests else self._prefix_digest
            self._digests += self.layout.digests(ids[done:], after=after)
        return self._digests[idx]

    def _put(self, items: list[tuple[str, torch.Tensor]], *, count: bool = True) -> None:
        if not self.enabled or not items:
            return
        try:
            self.store.put_many(items, non_blocking=items[0][1].is_cuda)
        except Exception as e:  # never let storage trouble break generation
            self._disable(f"store.put failed: {e}")
            return
        if count:
            self.bytes_saved += sum(v.numel() * v.element_size() for _, v in items)


class _NotInternal:
    active = False


def _both(first, second):
    def both(module, args, output):
        first(module, args, output)
        second(module, args, output)

    return both


class _ForwardWrapper:
    """`module.forward` replaced, for one saver's call, by itself between `before` and `after`.

    The wrapper is an attribute of the instance, so `module(...)` keeps torch's fast
    path (no hooks to dispatch). `remove()` puts back what the instance had. Should
    something have wrapped `forward` again on top of this one, this one only stops
    watching (and lets go of the saver), so that the other keeps working; a saver's
    wrapper that stopped watching is skipped when the one above it is removed.
    """

    def __init__(self, module: torch.nn.Module, before, after):
        self.module = module
        self.previous = own_forward(module)
        inner = module.forward
        calls = self._calls = [before, after]  # emptied by remove(): nothing then refers to the saver

        def forward(*args, **kwargs):
            before, after = calls
            if before is not None:
                before(module, args, kwargs)
            output = inner(*args, **kwargs)
            if after is not None:
                after(module, args, output)
            return output

        forward.saver_wrapper = self
        self.forward = forward
        module.forward = forward

    @property
    def watching(self) -> bool:
        return self._calls != [None, None]

    def remove(self) -> None:
        self._calls[:] = [None, None]
        if self.module.__dict__.get("forward") is not self.forward:
            return  # wrapped again on top: stay in place, passing calls through
        previous = self.previous
        while getattr(previous, "saver_wrapper", None) is not None and not previous.saver_wrapper.watching:
            previous = previous.saver_wrapper.previous  # an earlier saver that was removed under this one
        put_back_forward(self.module, previous)

"""Recomputer: K/V of leading layers from tokens, through the model's own forward.

`auto` recomputes the first r layers of a prefix instead of loading them (the
bubble-free split), and a layer whose stored chunks turn out unreadable in the
middle of generate() is recomputed rather than served wrong. Both run the
model's base model on the prefix tokens with a pre-hook on decoder layer r that
ends the forward there, so layers r.. and the LM head never run.

While it runs, `internal` is set: hooks that watch the model's forward passes
for another purpose (the state saver) ignore these passes.

Layer 0's input hidden state is, for most decoder-only models, the token
embedding itself: `first_input` produces it from the token ids (a gather on
the device) so a restore need not load that layer's saved hidden state. Whether
a model is one of them is probed once, exactly (`embeds_first_layer`).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

import torch

from hcache_adapter.compat import cache_kwarg, generate_positions, layer_kv, new_cache


class _StopForward(Exception):
    """Raised by a pre-hook to end a forward pass after the layers we want."""


class InternalForward(threading.local):
    """Whether the current thread is inside a forward pass HCache runs for itself."""

    active = False

    @contextmanager
    def running(self):
        """Mark what runs inside as HCache's own work (a projection through the model's own layers, a
        recomputation): hooks watching the model for the user's forward passes ignore it."""
        previous, self.active = self.active, True
        try:
            yield
        finally:
            self.active = previous


class Recomputer:
    def __init__(self, model: torch.nn.Module, decoder_layers: list[torch.nn.Module]):
        self.model = model
        self.decoder_layers = decoder_layers
        self.internal = InternalForward()
        self._cache_kw = cache_kwarg(model.base_model)
        self.cache_kwarg = cache_kwarg(model)  # the model's own forward's name for the cache
        self._embeds: bool | None = None  # `embeds_first_layer`, once probed

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @torch.no_grad()
    def prefix(self, ids: torch.Tensor, layers: int, cache=None, *, after_first: Callable[[], None] | None = None):
        """Run `ids` ([B, T]) through the first `layers` decoder layers, filling `cache` (a new one if None).

        `after_first()` is called once layer 0's work is issued: a split restore starts its NVMe readers
        then, so that their Python (hundreds of chunks to plan and verify, sharing the interpreter) does
        not hold back the first work the device gets (on the lent H200, 7B at 16K: 4.7 ms before the first
        recomputed layer with the readers started first)."""
        cache = new_cache(self.model) if cache is None else cache
        if layers <= 0:
            if after_first is not None:
                after_first()
            return cache
        hooks = []
        if layers < self.num_layers:
            def stop(module, args, kwargs):
                raise _StopForward

            hooks.append(self.decoder_layers[layers].register_forward_pre_hook(stop, with_kwargs=True))
        if after_first is not None and layers > 1:
            hooks.append(self.decoder_layers[1].register_forward_pre_hook(lambda *a: after_first()))
        try:
            start = cache.get_seq_length()
            with self.internal.running():
                self.model.base_model(input_ids=ids, use_cache=True, **{self._cache_kw: cache},
                                      **generate_positions(self.model, start, start + ids.shape[1], ids.device))
        except _StopForward:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        if after_first is not None and layers == 1:
            after_first()
        return cache

    @property
    def embeds_first_layer(self) -> bool:
        """Whether decoder layer 0's input is exactly the input embedding of the tokens (Llama, Mistral,
        Qwen, Gemma, whose embedding module scales; not GPT-2 or OPT, which add position embeddings): probed once by
        running a few tokens up to layer 0 and comparing bit for bit."""
        if self._embeds is None:
            self._embeds = self._probe_first_input()
        return self._embeds

    def first_input(self, ids: torch.Tensor) -> torch.Tensor:
        """Layer 0's input hidden state for `ids` ([1, n] on the model's device): their input embedding
        (only where `embeds_first_layer`). Marked internal: the saver's hook on the embedding ignores it."""
        with self.internal.running():
            return self.model.get_input_embeddings()(ids)

    @torch.no_grad()
    def _probe_first_input(self) -> bool:
        try:
            embed = self.model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return False
        if not isinstance(embed, torch.nn.Embedding) or not self.decoder_layers:
            return False
        ids = torch.arange(1, min(9, embed.num_embeddings), device=embed.weight.device).unsqueeze(0)
        seen = []

        def grab(module, args, kwargs):
            seen.append(args[0] if args else kwargs.get("hidden_states"))
            raise _StopForward

        hook = self.decoder_layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with self.internal.running():
                self.model.base_model(input_ids=ids, use_cache=False)
        except _StopForward:
            pass
        except Exception:  # an unusual model (extra inputs, another layout): load layer 0 as saved
            return False
        finally:
            hook.remove()
        if not seen or not isinstance(seen[0], torch.Tensor):
            return False
        expected = embed(ids)
        return seen[0].shape == expected.shape and seen[0].dtype == expected.dtype and torch.equal(seen[0], expected)

    def layer(self, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of one layer for `ids`, recomputed through every layer before it (the slow, always-right path)."""
        kv = layer_kv(self.prefix(ids, layer + 1), layer)
        if kv is None:
            raise RuntimeError(f"the model's cache holds no K/V for layer {layer}")
        return kv

"""Taking over generate()'s first forward pass.

generate() calls the model's forward for its prefill and then once per token.
HCache sometimes has to run that first call itself: to replay it from a CUDA
graph, or to skip prompt tokens a restored cache already holds where
transformers' speculative decoding feeds the whole prompt on its first
iteration regardless of the cache. `first_forward` routes exactly one call
to a handler and then gets out of the way; the model is left as it was.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable

import torch

from hcache_adapter.forwards import own_forward, put_back_forward

Handler = Callable[..., object]  # handler(forward, *args, **kwargs) -> the forward's output


@contextmanager
def first_forward(model: torch.nn.Module, handler: Handler):
    """While active, the model's next forward call goes to `handler(forward, *args, **kwargs)`."""
    own = own_forward(model)  # e.g. a user's `model.forward = torch.compile(model.forward)`
    original = model.forward

    def wrapper(*args, **kwargs):
        put_back_forward(model, own)
        return handler(original, *args, **kwargs)

    functools.update_wrapper(wrapper, original)  # generate() inspects forward's signature
    model.forward = wrapper
    try:
        yield
    finally:
        if model.__dict__.get("forward") is wrapper:
            put_back_forward(model, own)


@contextmanager
def after_first_forward(model: torch.nn.Module, fn: Callable[[], None]):
    """While active, `fn()` runs once, right after the model's next forward returns (or at exit if none ran).
    The hook removes itself at once: later forwards (a compiled decode step) see the model as it was."""
    done = [False]

    def once() -> None:
        if not done[0]:
            done[0] = True
            handle.remove()
            fn()

    handle = model.register_forward_hook(lambda *args: once())
    try:
        yield
    finally:
        handle.remove()
        once()


def skip_cached_tokens(cache_kwarg: str):
    """A handler that drops the input tokens the cache already holds (the prompt prefix it was restored for).

    The logits generate() keeps are those of the last tokens, which are all still
    computed; the 2D attention mask keeps covering cached and new tokens alike.
    """

    def handler(forward, *args, **kwargs):
        cache = kwargs.get(cache_kwarg)
        ids = kwargs.get("input_ids")
        n = cache.get_seq_length() if cache is not None else 0
        if isinstance(n, torch.Tensor):
            n = int(n)
        if n and not args and isinstance(ids, torch.Tensor) and ids.shape[1] > n:
            mask = kwargs.get("attention_mask")
            if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
                full = ids.shape[1]
                kwargs["input_ids"] = ids[:, n:]
                for name in ("position_ids", "cache_position", "token_type_ids"):
                    t = kwargs.get(name)
                    if isinstance(t, torch.Tensor) and t.shape[-1] == full:
                        kwargs[name] = t[..., n:]
        return forward(*args, **kwargs)

    return handler

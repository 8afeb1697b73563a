"""Whether a model continues a filled cache as it would have computed it from scratch.

Every restore relies on that: the state of a prefix does not depend on later
tokens (causal attention), and the model's forward over new tokens on top of a
filled cache leaves the state (and gives the logits) that one pass over all
tokens does.  Transformers models do not all keep that promise for several new
tokens at once: some state-space models only step one token at a time (their
chunked path starts from an empty state), some position or mask code differs
between ``generate()``'s first call on a filled cache and a call from scratch.
`continuation` measures it with a few tokens and says how HCache may continue
after a restore:

* ``"chunk"``: one forward over all new tokens (what ``generate()`` does);
* ``"step"``: the new tokens one at a time (the last one left to ``generate()``);
* ``None``: neither reproduces a prefill; nothing restored would be right.

A cache of recurrent layers only (Mamba) has, before transformers 5.25, no length
``generate()`` can read, so ``generate()`` must then be given only the tokens after
the cache (`new_tokens_only`); the check does the same.  From 5.25 its layers
count their tokens, and it is given all ids like any other cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hcache_adapter.compat import cache_kwarg, new_cache
from hcache_adapter.generation import with_cache

from .calls import accepts
from .capture import state_difference, state_scale

CHUNK, STEP = "chunk", "step"
GENERATE_TOKENS = 3  # the first step after a restore, and decode steps after it
TOLERANCE = 1e-5  # relative: what a restore must reproduce in float32


def _forward(base: nn.Module, ids: Tensor, cache: Any, start: int = 0) -> Any:
    """The base model's forward over `ids` at positions start.. (given explicitly, as generate() gives them)."""
    kwargs = {cache_kwarg(base): cache}
    if accepts(base, "position_ids"):
        kwargs["position_ids"] = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    with torch.no_grad():
        return base(input_ids=ids, use_cache=True, **kwargs)


def _state_gap(got: Any, want: Any, tol: float) -> str:
    for i, (a, b) in enumerate(zip(got.layers, want.layers)):
        diff, where = state_difference(a, b)
        if diff / max(1.0, state_scale(b)) > tol:
            return f"layer {i}, {where}: {diff:.3g}"
    return ""


def _filled(model: nn.Module, base: nn.Module, ids: Tensor, prefix: int, upto: int, mode: str) -> Any:
    """A cache of `ids[:, :upto]`: a prefill of `prefix` tokens, then the rest as `mode` continues."""
    cache = new_cache(model)
    _forward(base, ids[:, :prefix], cache)
    if mode == CHUNK and upto > prefix:
        _forward(base, ids[:, prefix:upto], cache, prefix)
    else:
        for t in range(prefix, upto):
            _forward(base, ids[:, t : t + 1], cache, t)
    return cache


def step_through(base: nn.Module, ids: Tensor, cache: Any, start: int, end: int) -> None:
    """Run tokens start..end-1 of `ids` on `cache` one at a time (a "step" model's continuation)."""
    ids = ids.to(next(base.parameters()).device)
    for t in range(start, end):
        _forward(base, ids[:, t : t + 1], cache, t)


def generate_on(model: nn.Module, ids: Tensor, cached: int, kwargs: dict[str, Any]) -> Any:
    """``model.generate(ids, **kwargs)`` for a cache already holding the first `cached` tokens of `ids`, which
    generate() is not shown (a recurrent-only cache, see `new_tokens_only`); its output is for all of `ids`."""
    if not cached:
        return model.generate(ids, **kwargs)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs = {**kwargs, "attention_mask": mask[:, cached:]}
    out = model.generate(ids[:, cached:], **kwargs)
    if isinstance(out, Tensor):
        return torch.cat([ids[:, :cached].to(out.device), out], dim=1)
    out.sequences = torch.cat([ids[:, :cached].to(out.sequences.device), out.sequences], dim=1)
    return out


def filled_length(cache: Any) -> int:
    """The length a filled cache reports, 0 where it reports none: before transformers 5.25 a cache of
    recurrent layers only raises (its layers keep no token count); from 5.25 they count their tokens."""
    try:
        return int(cache.get_seq_length())
    except ValueError:
        return 0


def new_tokens_only(cache: Any) -> bool:
    """Whether generate() on this filled cache must be given only the tokens after it.

    generate() starts after the length the cache reports; a cache of recurrent layers only that reports
    none (transformers < 5.25) would have generate() run the whole prompt again on top of its state. One that
    reports its length (5.25 on) is given all ids, as any other cache is."""
    flags = getattr(cache, "is_linear", None)
    return bool(flags) and all(flags) and not filled_length(cache)


def continuation(model: nn.Module, base: nn.Module, ids: Tensor, prefix: int, tol: float) -> tuple[str | None, str]:
    """(mode, why no mode works) for continuing `prefix` tokens of `ids` with the rest (module doc)."""
    tol = max(tol, TOLERANCE)
    whole = new_cache(model)
    try:
        _forward(base, ids, whole)
    except Exception as e:
        return None, f"its forward does not run on {ids.shape[1]} tokens ({type(e).__name__}: {str(e)[:160]})"
    gaps, errors, generate_gaps = {}, {}, []
    for mode in (CHUNK, STEP):
        try:
            gap = _state_gap(_filled(model, base, ids, prefix, ids.shape[1], mode), whole, tol)
        except Exception as e:
            errors[mode] = gap = f"{type(e).__name__}: {str(e)[:160]}"
        if gap:
            gaps[mode] = gap
            continue
        why = _generate_gap(model, base, ids, prefix, mode, tol)
        if not why:
            return mode, ""
        generate_gaps.append(why)
    if generate_gaps:
        return None, generate_gaps[0]
    if len(errors) == 2:
        return None, f"its forward cannot continue from a filled cache ({errors[CHUNK]})"
    return None, (f"a filled cache continued by its forward differs from a prefill of all tokens "
                  f"({gaps[CHUNK]}; one token at a time: {gaps[STEP]}): its attention is not causal, "
                  f"or its step path differs from its prefill")


def _generate_gap(model: nn.Module, base: nn.Module, ids: Tensor, prefix: int, mode: str, tol: float) -> str:
    """Empty if ``generate()`` on a cache filled as `mode` continues gives the logits it gives from scratch.

    Greedy, so the tokens after the first step are the same in both runs unless the logits already differ.
    The run from scratch comes between filling the cache and continuing it, so a model that keeps state
    outside its cache (on its modules) continues from the wrong state and shows it.
    """
    if not hasattr(model, "generate") or model is base:
        return ""
    pad = getattr(model.generation_config, "pad_token_id", None)
    kw = dict(max_new_tokens=GENERATE_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=pad if pad is not None else 0)
    upto = ids.shape[1] - 1 if mode == STEP else prefix  # step: generate() gets only the last token
    try:
        cache = _filled(model, base, ids, prefix, upto, mode)
    except Exception as e:
        return f"its forward cannot fill a cache ({type(e).__name__}: {str(e)[:160]})"
    try:  # after filling: state a model keeps outside its cache (on its modules) now belongs to this run
        fresh = torch.stack(model.generate(ids, **kw).logits)
    except Exception:  # generate() itself does not run here: there is nothing a restore could break
        return ""
    given = ids[:, upto:] if new_tokens_only(cache) else ids
    try:
        with with_cache(model, kw, cache_kwarg(model), cache) as given_kw:  # a model-level cache_implementation
            continued = torch.stack(model.generate(given, **given_kw).logits)
    except Exception as e:
        return f"generate() cannot continue from a filled cache ({type(e).__name__}: {str(e)[:160]})"
    diff = (continued.float() - fresh.float()).abs().max().item()
    if diff / max(1.0, fresh.float().abs().max().item()) > tol:
        return (f"generate() on a filled cache gives other logits than from scratch ({diff:.3g}): "
                f"the model keeps state outside its cache, or its mask or position code differs between the two")
    return ""

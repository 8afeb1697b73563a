"""Hand-written fast paths by ``config.model_type``, and `projector_for`, the one way to get a projector.

A family module decorates its class with ``@register("llama", "mistral")``.
`projector_for(model)` asks `support(model)` (``support.py``): the model is
probed once, and the result is the registered fast path when there is one and
it reproduces the model's own cache, else the generic projection through the
model's own modules, else ``None`` when the model's state cannot be rebuilt
from hidden states (the caller falls back; `support` says why).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import Projector
from .support import Support
from .support import support as probe_support

ProjectorFactory = Callable[[nn.Module], Projector]

_REGISTRY: dict[str, ProjectorFactory] = {}


def register(*model_types: str) -> Callable[[type[Projector]], type[Projector]]:
    """Class decorator: serve `model_types` (values of ``config.model_type``) with this projector."""
    if not model_types:
        raise ValueError("register() needs at least one model_type")

    def decorate(cls: type[Projector]) -> type[Projector]:
        for model_type in model_types:
            owner = _REGISTRY.get(model_type)
            if owner is not None and owner is not cls:
                raise ValueError(f"model_type {model_type!r} already registered to {owner.__name__}")
            _REGISTRY[model_type] = cls
        return cls

    return decorate


def fast_projector_for(model: nn.Module) -> Projector | None:
    """The registered hand-written projector for `model`'s type, unchecked, or None (tests and benchmarks)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    factory = _REGISTRY.get(model_type) if model_type is not None else None
    return factory(model) if factory is not None else None


def generic_projector_for(model: nn.Module) -> Projector | None:
    """The generic projection for `model` even where a fast path exists (tests and benchmarks compare the two)."""
    return probe_support(model).projector


def support(model: nn.Module) -> Support:
    """How HCache can serve `model`: hidden-state restore, K/V only, recompute, or refused (``support.py``)."""
    return probe_support(model, fast_path=fast_projector_for)


def projector_for(model: nn.Module) -> Projector | None:
    """A projector bound to `model` (a ``*ForCausalLM`` or its base model), or None if its state is not rebuildable."""
    return support(model).projector


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that have a hand-written fast path, sorted."""
    return sorted(_REGISTRY)

"""Maps ``config.model_type`` to the `Projector` class that knows that architecture.

A family module decorates its class with ``@register("llama", "mistral")``;
`projector_for` looks the model's type up.  Unknown architectures get ``None``:
the caller decides how to fall back (and whether to warn); nothing is logged here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import Projector

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


def projector_for(model: nn.Module) -> Projector | None:
    """A projector bound to `model` (a ``*ForCausalLM`` or its base model), or None if unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    factory = _REGISTRY.get(model_type) if model_type is not None else None
    return factory(model) if factory is not None else None


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that have a projector, sorted."""
    return sorted(_REGISTRY)

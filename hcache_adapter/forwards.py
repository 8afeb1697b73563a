"""A module's own `forward` (an instance attribute shadowing its class's), saved and put back.

HCache replaces a module's `forward` on the instance for a while in three places: the
handler of generate()'s first forward, the saver's watching of the layers, and the
generic projection's recording of the layers' calls. Each must leave whatever the
instance had of its own (a user's `model.forward = torch.compile(model.forward)`, an
accelerate hook, another wrapper) as it found it.
"""
from __future__ import annotations

import torch

NO_FORWARD = object()  # what `own_forward` returns for an instance without a `forward` of its own


def own_forward(module: torch.nn.Module):
    """The instance's own `forward`, or NO_FORWARD."""
    return module.__dict__.get("forward", NO_FORWARD)


def put_back_forward(module: torch.nn.Module, own) -> None:
    """Make `own` (from `own_forward`) the instance's `forward` again."""
    if own is NO_FORWARD:
        module.__dict__.pop("forward", None)
    else:
        module.forward = own

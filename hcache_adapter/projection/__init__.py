"""HCache projection: rebuild each decoder layer's K and V from the layer's saved input hidden state.

    proj = projector_for(model)            # None when the architecture is not supported
    k, v = proj.project(layer, hidden, position_ids)   # [B, kv_heads, T, head_dim] each

One module per family, named after transformers' modeling modules; each
registers its `Projector` subclass for one or more ``config.model_type`` values.
Adding a family is one small module here plus its case in tests/test_projection.py.
"""

from .base import Projector
from .registry import projector_for, register, supported_model_types

# Importing the family modules registers them.
from . import falcon, gpt2, gpt_neox, llama, opt, phi3, qwen3  # noqa: E402,F401  isort: skip

__all__ = ["Projector", "projector_for", "register", "supported_model_types"]

"""HCache projection: rebuild each decoder layer's cache from the layer's saved input hidden state.

    s = support(model)                     # up front: "hidden" | "kv" | "recompute" | "refused", and why
    proj = projector_for(model)            # s.projector: None when the state is not rebuildable
    k, v = proj.project(layer, hidden, position_ids)   # [B, kv_heads, T, head_dim] each
    proj.fill_prefix(cache, layer, hidden, position_ids)  # any cache layer kind, into a transformers Cache

Every architecture goes through the generic projection (``generic.py``), which
runs the model's own modules up to its cache write; hand-written fast paths
(one module per family, named after transformers' modeling modules) register
for their ``config.model_type`` and are used where they reproduce the model's
cache.  Adding a fast path: a small module here with ``@register(...)``, and
its family in tests/hcache/test_projection.py's CASES (checked bit-exact
against the generic projection).
"""

from .base import Projector
from .generic import GenericProjector, NoKVCache
from .registry import (fast_projector_for, generic_projector_for, projector_for, register, support,
                       supported_model_types)
from .support import LayerSupport, Support

# Importing the family modules registers them.
from . import falcon, gpt2, gpt_neox, llama, opt, phi3, qwen3  # noqa: E402,F401  isort: skip

__all__ = ["GenericProjector", "LayerSupport", "NoKVCache", "Projector", "Support", "fast_projector_for",
           "generic_projector_for", "projector_for", "register", "support", "supported_model_types"]

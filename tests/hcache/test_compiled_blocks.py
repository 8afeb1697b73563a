"""The captured prefill compiles a decoder layer's norms, MLP and rotary while it captures: the model's
outputs stay its own, and nothing of the compilation outlives the capture."""
from __future__ import annotations

import sys

import torch

from hcache_adapter.bench.models import build_model
from hcache_adapter.fused_blocks import compiled_blocks


def test_compiled_blocks_keep_the_models_outputs_and_leave_no_trace():
    torch.manual_seed(0)
    model = build_model("tiny", dtype=torch.float32, device="cpu")
    layers = list(model.model.layers)
    modeling = sys.modules[type(layers[0]).__module__]
    rotary = modeling.apply_rotary_pos_emb
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        ref = model(ids).logits
        with compiled_blocks(layers):
            assert all("forward" in vars(layer.mlp) for layer in layers)
            assert modeling.apply_rotary_pos_emb is not rotary
            fused = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, ref)
    assert not any("forward" in vars(c) for layer in layers for c in layer.children())
    assert modeling.apply_rotary_pos_emb is rotary

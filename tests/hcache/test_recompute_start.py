"""Recomputer.prefix's `after_first`: called once, after layer 0's forward and before layer 1's (a split
restore starts its NVMe readers there, with the device already given work)."""
import pytest
import torch
from tests.helpers.models import build

from hcache_adapter.recompute import Recomputer


@pytest.mark.parametrize("layers", [0, 1, 2, None])
def test_after_first_is_called_once_between_layer_0_and_layer_1(layers):
    model = build("llama_mha")
    decoder = list(model.model.layers)
    layers = len(decoder) if layers is None else layers
    events = []
    hooks = [decoder[i].register_forward_hook(lambda *a, i=i: events.append(f"layer {i}")) for i in range(2)]
    try:
        ids = torch.randint(3, model.config.vocab_size, (1, 16))
        cache = Recomputer(model, decoder).prefix(ids, layers, after_first=lambda: events.append("start"))
    finally:
        for h in hooks:
            h.remove()
    assert events.count("start") == 1
    if layers == 0:
        assert events == ["start"]
    elif layers == 1:
        assert events == ["layer 0", "start"]
    else:
        assert events[:3] == ["layer 0", "start", "layer 1"]
    assert cache.get_seq_length() == (16 if layers else 0)

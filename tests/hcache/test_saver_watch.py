"""How the saver watches the model: wrapped `forward`s (the default) or registered hooks, the same state
either way, and every module left as it was found, whatever else wrapped it meanwhile.

Tiny random models in float32 on the CPU, real stores.
"""
from __future__ import annotations

import pytest
import torch
from tests.helpers.models import build

from hcache_adapter import HCache
from hcache_adapter.capture import StateSaver
from hcache_adapter.compat import cache_kwarg, new_cache
from hstore import StoreConfig, TieredStore

C = 8


def _store(root):
    return TieredStore(StoreConfig(root=root, dram_bytes=4 << 20, nvme_bytes=0))


def _saver(hc, store, wrap: bool, cache=None) -> StateSaver:
    return StateSaver(hc.layout, store, hc.save_plan(), start=0, cache=cache, prefix_digest=None,
                      decoder_layers=hc.decoder_layers, embeddings=hc.model.get_input_embeddings(),
                      internal=hc.recomputer.internal, wrap_forward=wrap)


def _saved(store) -> dict[bytes, torch.Tensor]:
    return {k: store.get(k) for k in sorted(store.keys())}


@pytest.mark.parametrize("name", ["llama_mha", "qwen3_gqa_knorm"])
@pytest.mark.parametrize("method", ["hcache", "kv", "auto"])
def test_wrapped_forwards_save_what_hooks_save(tmp_path, name, method):
    model = build(name)
    ids = torch.randint(3, model.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(0))
    saved = {}
    for wrap in (True, False):
        with _store(tmp_path / str(wrap)) as store:
            hc = HCache(model, store, method=method, chunk_tokens=C)
            cache = new_cache(model)  # K/V layers are saved from the cache generate() fills
            saver = _saver(hc, store, wrap, cache)
            with saver, torch.no_grad():
                out = model.generate(ids, max_new_tokens=12, do_sample=False, **{cache_kwarg(model): cache})
            assert saver.chunks_saved == (ids.shape[1] + 12 - 1) // C
            saved[wrap] = _saved(store)
    assert saved[True].keys() == saved[False].keys() and saved[True]
    for k, v in saved[True].items():
        assert torch.equal(v, saved[False][k]), k
    assert torch.equal(out, model.generate(ids, max_new_tokens=12, do_sample=False))


def test_every_module_is_left_as_it_was_found(tmp_path):
    model = build("llama_mha")
    layers = model.model.layers
    mine = layers[1].forward

    def own(*args, **kwargs):  # an instance forward of its own, as an accelerate hook installs
        return mine(*args, **kwargs)

    layers[1].forward = own
    with _store(tmp_path / "s") as store:
        hc = HCache(model, store, chunk_tokens=C)
        with _saver(hc, store, True):
            assert all("forward" in layer.__dict__ for layer in layers)
        assert layers[1].__dict__["forward"] is own
        assert all("forward" not in layer.__dict__ for i, layer in enumerate(layers) if i != 1)
        assert "forward" not in model.get_input_embeddings().__dict__
        ids = torch.randint(3, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
        for wrap in (True, False):
            saver = _saver(hc, store, wrap)
            with saver:
                pass
            with torch.no_grad():
                model.generate(ids, max_new_tokens=4, do_sample=False)
            assert saver.chunks_saved == 0  # nothing of it is left on the model to see that generate


def test_a_forward_wrapped_again_on_top_keeps_working_and_stops_being_watched(tmp_path):
    model = build("llama_mha")
    layer = model.model.layers[0]
    ids = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    seen = []
    with _store(tmp_path / "s") as store:
        hc = HCache(model, store, chunk_tokens=C)
        saver = _saver(hc, store, True)
        with saver:
            below = layer.forward

            def on_top(*args, **kwargs):
                seen.append(1)
                return below(*args, **kwargs)

            layer.forward = on_top  # something else wraps the saver's wrapper while it is active
        assert layer.__dict__["forward"] is on_top  # left in place: removing ours would drop theirs
        before = saver.chunks_saved
        with torch.no_grad():
            want = model(ids).logits
        assert seen and saver.chunks_saved == before  # the saver no longer watches, the forward still runs
        del layer.forward
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)


@pytest.mark.parametrize("first_out", ["outer", "inner"])
def test_two_savers_at_once_leave_nothing_behind_in_either_order(tmp_path, first_out):
    import gc
    import weakref

    model = build("llama_mha")
    layers = model.model.layers
    ids = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with _store(tmp_path / "s") as store:
        hc = HCache(model, store, chunk_tokens=C)
        outer, inner = _saver(hc, store, True), _saver(hc, store, True)
        outer.__enter__()
        inner.__enter__()
        first, second = (outer, inner) if first_out == "outer" else (inner, outer)
        first.__exit__(None, None, None)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False)
        assert first.chunks_saved == 0 and second.chunks_saved == (20 + 4 - 1) // C  # only the one still entered
        second.__exit__(None, None, None)
        assert all("forward" not in layer.__dict__ for layer in layers)
        assert "forward" not in model.get_input_embeddings().__dict__
        gone = weakref.ref(first), weakref.ref(second)
        del outer, inner, first, second
        gc.collect()
        assert all(ref() is None for ref in gone)  # no wrapper left on the model holds a saver

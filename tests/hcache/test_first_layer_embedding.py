"""Layer 0 made from the token embedding instead of loaded (`Restorer.embeds_first`).

For most decoder-only models layer 0's input hidden state is the input embedding of the tokens,
so a restore projects layer 0 from a gather on the device and reads one layer fewer. These tests
check which models qualify (probed bit for bit), that such a restore reads nothing of layer 0
(its stored chunks overwritten with wrong values change nothing), and that models which do not
qualify still read it (the same overwrite then shows).

Tiny random models in float32 on the CPU, 8-token chunks.
"""
from __future__ import annotations

import pytest
import torch
from tests.hcache.test_hcache import ATOL, C, GEN, assert_cache_exact, prefill_kv, prompt
from tests.helpers.models import build

from hcache_adapter import HCache
from hcache_adapter.manifest import HIDDEN
from hstore import StoreConfig, TieredStore


@pytest.fixture
def store(tmp_path):
    s = TieredStore(StoreConfig(root=tmp_path / "store", dram_bytes=8 << 20, nvme_bytes=32 << 20))
    yield s
    s.close()


@pytest.mark.parametrize("arch, embeds", [
    ("llama_mha", True), ("llama_gqa", True), ("mistral_gqa", True), ("qwen2_gqa_bias", True),
    ("qwen3_gqa_knorm", True), ("phi3_gqa", True),
    ("gemma_mqa", True),  # its embedding module scales by sqrt(hidden size) itself
    ("gpt2", False),  # adds learned position embeddings
    ("opt_pre_ln", False),  # adds learned position embeddings
])
def test_which_models_feed_layer_0_their_token_embedding(arch, embeds, store):
    hc = HCache(build(arch), store, method="hcache", chunk_tokens=C)
    assert hc.recomputer.embeds_first_layer is embeds
    # a sliding-window cache layer (Mistral) is restored through the model's own cache layer, so it is loaded
    plain = 0 in hc.restorer.plain_layers
    assert plain or arch == "mistral_gqa"
    assert hc.restorer.embeds_first(HIDDEN * hc.layout.num_layers, 0) is (embeds and plain)
    assert hc.restorer.embeds_first(HIDDEN * hc.layout.num_layers, 1) is False  # recomputed, not loaded


def _overwrite_layer_0(hc: HCache, store, ids) -> int:
    """Overwrite every stored chunk of layer 0's hidden state with other finite values; returns how many."""
    keys = hc.layout.layer_keys([d.encode() for d in hc.digests(ids)], HIDDEN, 0)
    present = [k for k, where in zip(keys, store.locate(keys)) if where is not None]
    for key in present:
        value = store.get(key)
        store.put(key, torch.full_like(value, 0.5))
    return len(present)


@pytest.mark.parametrize("arch", ["llama_mha", "qwen3_gqa_knorm"])
def test_an_embedded_layer_0_is_not_read_and_is_exact(arch, store):
    model = build(arch)
    hc = HCache(model, store, method="hcache", chunk_tokens=C)
    ids = prompt(model, 33)
    out = hc.generate(ids, **GEN)
    assert torch.equal(out, model.generate(ids, **GEN))
    assert _overwrite_layer_0(hc, store, out) >= 4
    cache, n = hc.restore(out)
    assert n >= 32
    assert_cache_exact(model, cache, out, n)  # layer 0 included: projected from the embedding
    again = hc.generate(out, **GEN)
    assert torch.equal(again, model.generate(out, **GEN))


def test_a_model_that_does_not_embed_layer_0_reads_it(store):
    """The overwrite above is visible when layer 0 is loaded: the exactness check can fail."""
    model = build("gpt2")
    hc = HCache(model, store, method="hcache", chunk_tokens=C)
    ids = prompt(model, 33)
    hc.generate(ids, **GEN)
    assert _overwrite_layer_0(hc, store, ids) >= 4
    cache, n = hc.restore(ids)
    assert n >= 32
    k_ref, _ = prefill_kv(model, ids[:, :n])[0]
    assert (cache.layers[0].keys - k_ref).abs().max().item() > 100 * ATOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_restore_projects_layer_0_from_the_embedding(tmp_path, dtype):
    """On a GPU the embedded layer 0 is queued on the restore's side stream with the loaded layers, through
    the captured projection graphs: with layer 0's stored chunks overwritten, generate still gives
    model.generate's tokens, and restored layer 0 matches the model's own prefill to a few units in the
    last place of its largest value (another GEMM shape sums in another order)."""
    from tests.hcache.test_gpu import _tiny_gpu_model

    model = _tiny_gpu_model(dtype=dtype)
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method="hcache")
        assert hc.restorer.embeds_first(hc.save_plan(), 0)
        ids = torch.randint(10, 1000, (1, 300), device="cuda")
        gen = dict(max_new_tokens=8, do_sample=False)
        ref = model.generate(ids, **gen)
        assert torch.equal(hc.generate(ids, **gen), ref)
        assert _overwrite_layer_0(hc, store, ids) == 256 // hc.layout.chunk_tokens
        for rnd in range(3):
            assert torch.equal(hc.generate(ids, **gen), ref), f"round {rnd}"
            assert hc.last_restore.tokens == 256
        cache, n = hc.restore(ids)
        k_ref, v_ref = prefill_kv(model, ids[:, :n])[0]
        for got, want in ((cache.layers[0].keys, k_ref), (cache.layers[0].values, v_ref)):
            tol = 16 * torch.finfo(dtype).eps * max(1.0, want.abs().max().item())
            assert (got.float() - want.float()).abs().max().item() <= tol

"""Reads started before the lookup finished (`Restorer.begin`): taken over when the lookup agrees,
cancelled when it does not, and in neither case a change to what is restored.

Tiny random models in float32 on the CPU, real stores. `early_min_keys` is set to 1 so that their
short prefixes start early: by default a GPU starts only restores of >= 1,024 keys early, and a CPU none
(its reads are synchronous copies; reader threads read ahead instead).
"""
from __future__ import annotations

import pytest
import torch
from tests.helpers.models import build

from hcache_adapter import HCache
from hcache_adapter.keys import layer_key
from hcache_adapter.scheduler.planner import min_recompute
from hstore import StoreConfig, TieredStore

from tests.hcache.test_hcache import C, GEN, assert_cache_exact, prompt


@pytest.fixture
def store(tmp_path):
    s = TieredStore(StoreConfig(root=tmp_path / "store", dram_bytes=4 << 20, nvme_bytes=32 << 20))
    yield s
    s.close()


def _saved(store, name="llama_mha", method="hcache", n=58):
    model = build(name)
    hc = HCache(model, store, method=method, chunk_tokens=C)
    hc.restorer.early_min_keys = 1
    ids = prompt(model, n)
    hc.generate(ids, max_new_tokens=2, do_sample=False)
    return model, hc, ids


def _begin(hc, ids, chunks):
    digests = hc.digests(ids[0, : chunks * C])
    plan = hc.save_plan()
    return hc.restorer.begin(digests, plan, min_recompute(plan)), digests, plan


@pytest.mark.parametrize("method", ["hcache", "kv"])
def test_an_agreeing_lookup_takes_the_early_reads_over(store, method):
    model, hc, ids = _saved(store, method=method)
    early, digests, plan = _begin(hc, ids, 7)
    assert early is not None and early.chunks == 7 and hc.restorer.ring.lent
    cache, valid, release = hc.restorer.restore(ids, digests, plan, min_recompute(plan), lazy=False, early=early)
    release()
    assert early.taken and valid == 7
    assert_cache_exact(model, cache, ids, 7 * C)
    assert not hc.restorer.ring.lent  # the restore closed the loader it took over
    early.cancel()  # then a no-op


def test_a_lookup_that_disagrees_cancels_them_and_restores_the_same(store):
    model, hc, ids = _saved(store)
    early, digests, plan = _begin(hc, ids, 7)
    assert early is not None
    cache, valid, release = hc.restorer.restore(ids, digests[:5], plan, min_recompute(plan), lazy=False,
                                                early=early)
    release()
    assert not early.taken and not hc.restorer.ring.lent
    assert valid == 5
    assert_cache_exact(model, cache, ids, 5 * C)


def test_other_recomputed_layers_cancel_them(store):
    model, hc, ids = _saved(store)
    early, digests, plan = _begin(hc, ids, 7)
    cache, valid, release = hc.restorer.restore(ids, digests, plan, 1, lazy=False, early=early)
    release()
    assert not early.taken and valid == 7
    assert_cache_exact(model, cache, ids, 7 * C)


def test_nothing_starts_early_below_the_key_threshold_or_off_the_memory_tiers(store):
    model, hc, ids = _saved(store)
    digests = hc.digests(ids[0, : 7 * C])
    plan = hc.save_plan()
    assert HCache(model, store, chunk_tokens=C).restorer.early_min_keys is None  # the CPU's default: never
    first = hc.restorer.first_read(plan, 0)  # layer 0 is made from the token embedding, not read
    assert first == 1
    hc.restorer.early_min_keys = 7 * (len(plan) - first) + 1  # the keys read, not the keys stored
    assert hc.restorer.begin(digests, plan, 0) is None
    hc.restorer.early_min_keys = 7 * (len(plan) - first)
    early = hc.restorer.begin(digests, plan, 0)
    assert early is not None
    early.cancel()
    store.flush()
    store.drop_cached([layer_key("hc", digests[3], "h", 0)])  # layer 0 is not read: still starts early
    early = hc.restorer.begin(digests, plan, 0)
    assert early is not None
    early.cancel()
    store.drop_cached([layer_key("hc", digests[3], "h", first)])  # one chunk of the first read layer only on NVMe
    assert hc.restorer.begin(digests, plan, 0) is None
    assert hc.restorer.begin([], plan, 0) is None


def test_a_chunk_missing_in_a_later_layer_cuts_the_prefix_as_before(store):
    model, hc, ids = _saved(store)
    digests = hc.digests(ids[0, :56])
    store.delete(layer_key("hc", digests[4], "h", 1))  # the first layer is whole: the restore starts early
    cache, n = hc.restore(ids)
    assert n == 4 * C
    assert_cache_exact(model, cache, ids, n)
    assert torch.equal(hc.generate(ids, **GEN), model.generate(ids, **GEN))


@pytest.mark.parametrize("name", ["llama_gqa", "qwen3_gqa_knorm", "gpt2"])
def test_generate_with_early_reads_gives_the_models_tokens(store, name):
    model, hc, ids = _saved(store, name=name)
    for kwargs in (GEN, dict(max_new_tokens=4, do_sample=True, top_k=5), dict(max_new_tokens=3, num_beams=2)):
        torch.manual_seed(3)
        want = model.generate(ids, **kwargs)
        torch.manual_seed(3)
        got = hc.generate(ids, **kwargs)
        assert torch.equal(got, want), kwargs
        assert hc.last_restore.tokens == 7 * C
    cache, n = hc.restore(ids)
    assert n == 7 * C
    assert_cache_exact(model, cache, ids, n)


def test_a_later_layer_on_nvme_cancels_them_for_the_threaded_reader(store):
    from hcache_adapter.prefix import locate_layers

    model, hc, ids = _saved(store)
    store.flush()
    early, digests, plan = _begin(hc, ids, 7)
    assert early is not None
    store.drop_cached([layer_key("hc", digests[5], "h", len(plan) - 1)])
    where, _ = locate_layers(store, hc.layout, plan, digests)
    cache, valid, release = hc.restorer.restore(ids, digests, plan, 0, lazy=False, where=where, early=early)
    release()
    assert not early.taken and valid == 7
    assert_cache_exact(model, cache, ids, 7 * C)


def test_a_restore_that_fails_to_start_closes_the_loader_it_took_over(store, monkeypatch):
    model, hc, ids = _saved(store)
    early, digests, plan = _begin(hc, ids, 7)

    def broken(*args, **kwargs):
        raise RuntimeError("recomputation failed")

    monkeypatch.setattr(hc.recomputer, "prefix", broken)  # the leading layer's recomputation, run by start()
    with pytest.raises(RuntimeError, match="recomputation failed"):
        hc.restorer.restore(ids, digests, plan, 1, lazy=True, early=early)
    assert not hc.restorer.ring.lent  # the cancelled early loader and the restore's own were both closed
    cache, n = hc.restore(ids)  # and the next restore gets the ring again
    assert n == 7 * C
    assert_cache_exact(model, cache, ids, n)

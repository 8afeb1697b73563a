"""HCache inside generate(): exact restores for every architecture, multi-round chats,
reopened stores, corrupt and missing chunks, foreign models, and the scheduler's plans.

Tiny random models in float32 on the CPU (built by test_projection's CASES), with
8-token chunks so short sequences span several chunks.
"""
from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers.models import CASES, build as _build, tiny_causal_lm

from hcache_adapter import HCache, Profile
from hcache_adapter.compat import cache_kwarg, new_cache
from hcache_adapter.keys import chunk_digests, layer_key, manifest_key
from hcache_adapter.manifest import Manifest
from hcache_adapter.projection.continuation import filled_length
from hstore import StoreConfig, TieredStore

C = 8
ATOL = 1e-5
GEN = dict(max_new_tokens=6, do_sample=False)


def open_store(root, dram=1 << 20) -> TieredStore:
    return TieredStore(StoreConfig(root=root, dram_bytes=dram, nvme_bytes=32 << 20))


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "store")
    yield s
    s.close()


def prompt(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, n), generator=g)


@torch.no_grad()
def prefill_kv(model, ids):
    cache = new_cache(model)
    model(ids, use_cache=True, **{cache_kwarg(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def assert_cache_exact(model, cache, ids, n):
    ref = prefill_kv(model, ids[:, :n])
    assert len(cache.layers) == len(ref)
    for i, (k_ref, v_ref) in enumerate(ref):
        k, v = cache.layers[i].keys, cache.layers[i].values
        assert k.shape == k_ref.shape and v.shape == v_ref.shape, i
        assert (k - k_ref).abs().max().item() <= ATOL, f"layer {i} K"
        assert (v - v_ref).abs().max().item() <= ATOL, f"layer {i} V"


def slow_disk_profile(layers, hidden_bpt, kv_bpt, *, recompute_cheap: bool) -> Profile:
    """A profile where reading is slow and recomputing a layer is cheap (or very dear)."""
    rec = 1e-12 if recompute_cheap else 1.0
    return Profile(layers, hidden_bpt, kv_bpt, {"dram": 1e3, "nvme": 1e3}, (0.0, 1e-12), (0.0, rec, 0.0))


@pytest.mark.parametrize("method", ["hcache", "kv"])
@pytest.mark.parametrize("arch", sorted(CASES))
def test_restored_cache_equals_prefill_and_generate_is_unchanged(arch, method, store):
    model = _build(arch)
    hc = HCache(model, store, method=method, chunk_tokens=C)
    ids = prompt(model, 30)
    out = hc.generate(ids, **GEN)
    assert torch.equal(out, model.generate(ids, **GEN))
    follow = torch.cat([out, prompt(model, 10, seed=1)], dim=1)
    cache, n = hc.restore(follow)
    assert n == (out.shape[1] - 1) // C * C > 0
    assert hc.last_restore.plan == ("H" if method == "hcache" else "K") * hc.num_layers
    assert_cache_exact(model, cache, follow, n)
    assert torch.equal(hc.generate(follow, **GEN), model.generate(follow, **GEN))


def test_a_restored_recurrent_only_cache_reports_the_length_of_the_models_own(store):
    """generate() continues after the length a cache reports (Mamba's layers count their tokens from
    transformers 5.25, none before): a restored cache must report what the model's own prefill leaves."""
    model = tiny_causal_lm("mamba")
    hc = HCache(model, store, method="hcache", chunk_tokens=C)
    out = hc.generate(prompt(model, 20), **GEN)
    follow = torch.cat([out, prompt(model, 10, seed=1)], dim=1)
    cache, n = hc.restore(follow)
    own = new_cache(model)
    with torch.no_grad():
        model(follow[:, :n], use_cache=True, **{cache_kwarg(model): own})
    assert n > 0 and filled_length(cache) == filled_length(own)
    assert torch.equal(hc.generate(follow, **GEN), model.generate(follow, **GEN))


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2", "falcon_new_arch_2ln", "phi3_partial_rotary"])
@pytest.mark.parametrize("method", ["hcache", "kv", "auto", "recompute"])
def test_three_round_chat_survives_reopen(arch, method, tmp_path):
    model = _build(arch)
    root = tmp_path / "store"
    profile = slow_disk_profile(model.config.num_hidden_layers, 1, 1, recompute_cheap=False)
    ids = prompt(model, 12)
    restored = []
    for rnd in range(3):
        with open_store(root, dram=256 << 10) as store:  # reopened every round: restores come from NVMe
            hc = HCache(model, store, method=method, chunk_tokens=C, profile=profile)
            out = hc.generate(ids, **GEN)
            assert torch.equal(out, model.generate(ids, **GEN)), f"round {rnd}"
            restored.append(hc.last_restore.tokens)
            if method not in ("recompute",) and rnd:
                assert hc.last_restore.sources.get("nvme", 0) > 0
            store.flush()
        ids = torch.cat([out, prompt(model, 9, seed=rnd + 1)], dim=1)
    if method == "recompute":
        assert restored == [0, 0, 0]  # generate() is the model's own, nothing stored
    else:
        assert restored[0] == 0 and restored[1] > 0 and restored[2] > restored[1]


def test_corrupt_chunk_in_the_middle_stops_the_restore_there(tmp_path):
    model = _build("llama_mha")
    root = tmp_path / "store"
    ids = prompt(model, 58)
    with open_store(root) as store:
        hc = HCache(model, store, chunk_tokens=C)
        hc.generate(ids, max_new_tokens=2, do_sample=False)
        store.flush()
        digests = hc.digests(ids[0, :56])
        victim = store.durable_record(layer_key("hc", digests[3], "h", 1))
        data_file = victim.path
    with open(data_file, "r+b") as f:  # flip payload bytes of chunk 3, layer 1
        f.seek(victim.offset + 4096 + 100)
        byte = f.read(1)
        f.seek(victim.offset + 4096 + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open_store(root) as store:
        hc = HCache(model, store, chunk_tokens=C)
        cache, n = hc.restore(ids)
        assert n == 3 * C
        assert store.stats()["corrupt_chunks"] == 1
        assert_cache_exact(model, cache, ids, n)
        assert torch.equal(hc.generate(ids, **GEN), model.generate(ids, **GEN))


def test_missing_chunk_in_the_middle_stops_the_restore_there(store):
    model = _build("qwen3_gqa_knorm")
    hc = HCache(model, store, method="kv", chunk_tokens=C)
    ids = prompt(model, 50)
    hc.generate(ids, max_new_tokens=2, do_sample=False)
    store.delete(layer_key("hc", hc.digests(ids[0, :48])[2], "kv", 0))
    cache, n = hc.restore(ids)
    assert n == 2 * C
    assert_cache_exact(model, cache, ids, n)
    assert torch.equal(hc.generate(ids, **GEN), model.generate(ids, **GEN))


def test_state_of_another_model_is_never_restored(store):
    a = _build("llama_mha")
    torch.manual_seed(1)
    b = CASES["llama_mha"].build().eval()  # same architecture and config, other weights
    ids = prompt(a, 40)
    HCache(a, store, chunk_tokens=C).generate(ids, **GEN)
    hb = HCache(b, store, chunk_tokens=C)
    _, n = hb.restore(ids)
    assert n == 0
    assert torch.equal(hb.generate(ids, **GEN), b.generate(ids, **GEN))
    a64 = _build("llama_mha").to(torch.float64)  # same weights, other dtype: another model too
    assert HCache(a64, store, chunk_tokens=C).restore(ids)[1] == 0


def test_foreign_manifest_under_our_key_is_ignored(store):
    model = _build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C)
    ids = prompt(model, 30)
    hc.generate(ids, **GEN)
    d0 = hc.digests(ids[0, :C])[0]
    store.put(manifest_key("hc", d0), Manifest("someone-else", "HH", C, "float32").encode())
    assert hc.restore(ids)[1] == 0


class _TokenKey(torch.nn.Module):
    """k_proj plus an embedding of the tokens being run: K depends on more than the layer's hidden state."""

    def __init__(self, k_proj, tokens: dict):
        super().__init__()
        self.k_proj, self.tokens = k_proj, tokens
        self.embed = torch.nn.Embedding(128, k_proj.out_features)

    def forward(self, x):
        return self.k_proj(x) + self.embed(self.tokens["ids"])


def test_a_model_whose_k_v_need_more_than_hidden_states_falls_back_to_kv_with_one_warning(store, caplog):
    model = _build("llama_mha")
    tokens: dict = {}
    model.get_input_embeddings().register_forward_pre_hook(lambda m, args: tokens.__setitem__("ids", args[0]))
    for layer in model.model.layers:
        layer.self_attn.k_proj = _TokenKey(layer.self_attn.k_proj, tokens)
    with caplog.at_level(logging.WARNING):
        hc = HCache(model, store, method="hcache", chunk_tokens=C)
    assert hc.method == "kv"
    assert sum("falls back" in r.getMessage() for r in caplog.records) == 1
    ids = prompt(model, 30)
    out = hc.generate(ids, **GEN)
    assert torch.equal(out, model.generate(ids, **GEN))
    follow = torch.cat([out, prompt(model, 5, seed=3)], dim=1)
    _, n = hc.restore(follow)
    assert n > 0
    assert torch.equal(hc.generate(follow, **GEN), model.generate(follow, **GEN))


def test_batches_save_every_row(store):
    """A batch restores and saves per row (tests/hcache/test_batched.py covers it in depth)."""
    model = _build("llama_mha")
    hc = HCache(model, store, chunk_tokens=C)
    batch = torch.cat([prompt(model, 20, 1), prompt(model, 20, 2)])
    assert torch.equal(hc.generate(batch, **GEN), model.generate(batch, **GEN))
    assert [hc.restore(row[None]).tokens for row in batch] == [16, 16]


@pytest.mark.parametrize("mode", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2),
                                  dict(do_sample=True, num_return_sequences=3, top_k=5)])
def test_beams_and_return_sequences_restore_once_and_save_the_prompt(mode, store):
    model = _build("llama_gqa")
    hc = HCache(model, store, chunk_tokens=C)
    gen = dict(GEN, **mode)
    one = prompt(model, 21, 3)
    torch.manual_seed(7)
    out = hc.generate(one, **gen)
    torch.manual_seed(7)
    assert torch.equal(out, model.generate(one, **gen))
    assert hc.last_restore.tokens == 0 and len(store) > 0  # the prompt's two whole chunks were saved
    follow = torch.cat([one, prompt(model, 6, seed=4)], dim=1)
    torch.manual_seed(8)
    out = hc.generate(follow, **gen)
    assert hc.last_restore.tokens == 2 * C
    torch.manual_seed(8)
    assert torch.equal(out, model.generate(follow, **gen))


@pytest.mark.parametrize("plan", ["KH", "HK", "RH", "RK"])
def test_explicit_auto_plan_is_stored_and_honoured(plan, store):
    model = _build("llama_gqa")
    profile = slow_disk_profile(2, 1, 1, recompute_cheap=False)
    hc = HCache(model, store, method="auto", plan=plan, chunk_tokens=C, profile=profile)
    ids = prompt(model, 30)
    out = hc.generate(ids, **GEN)
    assert torch.equal(out, model.generate(ids, **GEN))
    digests = hc.digests(ids[0, :24])
    assert Manifest.decode(store.get(manifest_key("hc", digests[0]))).plan == plan
    for layer, kind in enumerate(plan):
        stored_h = layer_key("hc", digests[0], "h", layer) in store
        stored_kv = layer_key("hc", digests[0], "kv", layer) in store
        assert (stored_h, stored_kv) == (kind == "H", kind == "K")
    cache, n = hc.restore(out)
    assert hc.last_restore.plan == plan
    assert hc.last_restore.recompute_layers == plan.count("R")  # recomputing more is dear in this profile
    assert_cache_exact(model, cache, out, n)


def _auto_after_a_round_where_recomputing_is_free(store):
    model = _build("llama_mha")
    profile = slow_disk_profile(2, 256, 512, recompute_cheap=True)
    hc = HCache(model, store, method="auto", chunk_tokens=C, profile=profile)
    return model, hc, hc.generate(prompt(model, 40), **GEN)


def test_auto_recomputes_everything_when_reading_is_slow_and_compute_is_free(store):
    model, hc, out = _auto_after_a_round_where_recomputing_is_free(store)
    store.flush()
    store.drop_cached()  # on the slow tier: only there does auto weigh recomputation against reading
    cache, n = hc.restore(out)
    # Recomputing every layer is left to the caller's single prefill: nothing restored, nothing read.
    assert n == 0 and hc.last_restore.recompute_layers == 2 and cache.get_seq_length() == 0
    puts = store.stats()["puts"]
    follow = torch.cat([out, prompt(model, 3, seed=1)], dim=1)
    assert torch.equal(hc.generate(follow, **GEN), model.generate(follow, **GEN))
    stored = (out.shape[1] - 1) // C  # chunks already stored: not put again
    new_chunks = (follow.shape[1] + GEN["max_new_tokens"] - 1) // C - stored
    assert store.stats()["puts"] - puts == new_chunks * (1 + model.config.num_hidden_layers)  # layers + manifest


def test_auto_never_splits_a_memory_tier_restore(store):
    """From DRAM it is all or nothing, on the whole TTFT: a profile where reading DRAM is absurdly slow and
    recomputing free recomputes everything; one where recomputing is dear loads every layer, exactly."""
    model, hc, out = _auto_after_a_round_where_recomputing_is_free(store)
    _, n = hc.restore(out)
    assert n == 0 and hc.last_restore.recompute_layers == hc.num_layers
    L = model.config.num_hidden_layers
    dear = HCache(model, store, method="auto", chunk_tokens=C, plan="H" * L,
                  profile=slow_disk_profile(L, 1, 1, recompute_cheap=False))
    cache, n = dear.restore(out)
    assert n > 0 and dear.last_restore.sources.get("dram", 0) > 0 and dear.last_restore.recompute_layers == 0
    assert_cache_exact(model, cache, out, n)


def test_auto_save_plan_follows_the_profile(store):
    mha, gqa = _build("llama_mha"), _build("llama_gqa")
    fast = lambda h, kv: Profile(2, h, kv, {"dram": 5e10}, (0.0, 1e-9), (0.0, 1e-6, 0.0))  # noqa: E731
    h_mha = HCache(mha, store, method="auto", chunk_tokens=C, profile=fast(256, 512))
    assert h_mha.save_plan() == "HH"
    h_gqa = HCache(gqa, store, method="auto", chunk_tokens=C, profile=fast(256, 256))
    assert h_gqa.save_plan() == "KK"  # same bytes, no projection needed


def test_bytes_per_token_hidden_is_half_of_kv_for_mha_and_more_for_gqa(store):
    mha, gqa = _build("llama_mha"), _build("llama_mqa_bias")
    h, kv = HCache(mha, store, "hcache").bytes_per_token(), HCache(mha, store, "kv").bytes_per_token()
    assert 2 * h == kv == 2 * 2 * 64 * 4  # 2 layers x (K+V) x 64 wide x float32
    assert HCache(gqa, store, "hcache").bytes_per_token() > HCache(gqa, store, "kv").bytes_per_token()
    assert HCache(mha, store, "recompute").bytes_per_token() == 0


def test_prefix_keys_are_the_same_in_every_process():
    ids = list(range(100, 140))
    here = chunk_digests("fp", ids, C)
    code = "from hcache_adapter.keys import chunk_digests; print(','.join(chunk_digests('fp', list(range(100, 140)), 8)))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert there.stdout.strip().split(",") == here
    assert chunk_digests("fp", ids[:16], C) == here[:2]  # a prefix's digests are a prefix
    assert chunk_digests("other", ids, C)[0] != here[0]
    assert chunk_digests("fp", ids[16:], C, after=here[1]) == here[2:]


def test_prefix_keys_are_the_same_in_every_version():
    """Digests name stored state: a store written by an earlier version must still be found. These values are
    the first release's (d[c] = blake2b-128(d[c-1] || int64 little-endian tokens of chunk c))."""
    digests = chunk_digests("fp", list(range(100, 140)), 8)
    assert digests[:2] == ["6d5417c4efd3b3109fc100f0849d139c", "ed22ec191ac9eba277036ed6f78225b0"]
    assert digests[-1] == "dde77108f587a7dee2524367eb9be3fa"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**40), max_size=300), st.integers(1, 70), st.booleans())
def test_prefix_keys_are_the_chained_hash_of_each_chunk(ids, chunk, as_tensor):
    import hashlib

    prev, expect = hashlib.blake2b(b"seed", digest_size=16).digest(), []
    for c in range(len(ids) // chunk):
        prev = hashlib.blake2b(prev + struct.pack(f"<{chunk}q", *ids[c * chunk:(c + 1) * chunk]), digest_size=16).digest()
        expect.append(prev.hex())
    given_ids = torch.tensor(ids, dtype=torch.int64) if as_tensor else ids
    assert chunk_digests("seed", given_ids, chunk) == expect


def test_bad_arguments_are_clear_errors(store):
    model = _build("llama_mha")
    with pytest.raises(ValueError, match="method"):
        HCache(model, store, method="magic")
    with pytest.raises(ValueError, match="plan"):
        HCache(model, store, method="auto", plan="HX")
    with pytest.raises(ValueError, match="plan"):
        HCache(model, store, method="hcache", plan="HH")
    with pytest.raises(ValueError, match="one sequence"):
        HCache(model, store).restore(torch.zeros(2, 10, dtype=torch.long))


@pytest.mark.parametrize("method", ["hcache", "kv"])
def test_save_stores_a_document_ahead_of_time(method, store):
    model = _build("gpt_neox_partial_rotary")
    hc = HCache(model, store, method=method, chunk_tokens=C)
    doc = prompt(model, 29)
    assert hc.save(doc) == 24
    assert hc.save(doc) == 24  # idempotent: restored, nothing new
    question = torch.cat([doc[:, :24], prompt(model, 7, seed=5)], dim=1)
    cache, n = hc.restore(question)
    assert n == 24
    assert_cache_exact(model, cache, question, n)
    assert torch.equal(hc.generate(question, **GEN), model.generate(question, **GEN))


def _restore_from_nvme_until_recomputed(hc, store, model, ids, tries: int = 20) -> int:
    """Restore `ids` from NVMe (DRAM copies dropped first) until auto recomputes every layer, each split
    restore exact on the way (its profile is far faster than this CPU: splits take longer than it says);
    the last restore's token count."""
    for _ in range(tries):
        store.drop_cached()
        cache, n = hc.restore(ids)
        if hc.last_restore.recompute_layers == hc.num_layers:
            return n
        assert_cache_exact(model, cache, ids, n)
    return n


def test_auto_learns_when_loading_is_slower_than_profiled_and_then_recomputes(tmp_path):
    """A split restore that overruns its estimate lowers the tier's bandwidth for later plans,
    until recomputing every layer wins; the restored state stays exact throughout."""
    model = _build("llama_mha")
    L = model.config.num_hidden_layers
    with open_store(tmp_path / "s") as store:
        probe = HCache(model, store, method="kv", chunk_tokens=C)
        hidden_bpt = probe.layout.bytes_per_token(0, "H")
        rec = 1e-6  # seconds per token and layer; reading a layer's hidden state costs the same on paper
        profile = Profile(L, hidden_bpt, 2 * hidden_bpt, {"dram": hidden_bpt / rec, "nvme": hidden_bpt / rec},
                          (0.0, 1e-12), (0.0, rec, 0.0))
        hc = HCache(model, store, method="auto", chunk_tokens=C, profile=profile, plan="H" * L)
        ids = prompt(model, 40)
        hc.save(ids[:, :32])
        store.flush()
        store.drop_cached()
        cache, n = hc.restore(ids)
        assert 0 < hc.last_restore.recompute_layers < L  # the profile says: split
        assert_cache_exact(model, cache, ids, n)
        n = _restore_from_nvme_until_recomputed(hc, store, model, ids)
        assert hc.scheduler.nvme_efficiency < 1.0
        assert hc.last_restore.recompute_layers == L and n == 0  # recomputing everything: one prefill
        assert torch.equal(hc.generate(ids, **GEN), model.generate(ids, **GEN))


def test_measuring_the_profile_never_evicts_stored_state(tmp_path):
    """The NVMe probe takes at most a quarter of the free space: the user's chunks all stay."""
    model = _build("llama_mha")
    L = model.config.num_hidden_layers
    with TieredStore(StoreConfig(root=tmp_path / "s", dram_bytes=16 << 20, nvme_bytes=32 << 20)) as store:
        hc = HCache(model, store, method="auto", chunk_tokens=C, plan="H" * L)
        ids = prompt(model, 48)
        hc.save(ids[:, :40])
        store.flush()
        before = set(store.keys())
        assert "nvme" in hc.profile.read_bytes_per_s  # measured now
        assert before == set(store.keys())
        cache, n = hc.restore(ids)
        # the measured (noisy, CPU) profile decides whether loading beats one prefill; either way nothing is lost
        assert hc.last_restore.sources.get("dram", 0) + hc.last_restore.sources.get("nvme", 0) > 0
        assert "missing" not in hc.last_restore.sources
        if n:
            assert n == 40
            assert_cache_exact(model, cache, ids, n)
        else:
            assert hc.last_restore.recompute_layers == L


def test_auto_does_not_learn_from_memory_tier_restores(tmp_path):
    """From DRAM a restore's time is mostly fixed CPU cost: it must not lower any bandwidth."""
    model = _build("llama_mha")
    L = model.config.num_hidden_layers
    with open_store(tmp_path / "s", dram=8 << 20) as store:
        probe = HCache(model, store, method="kv", chunk_tokens=C)
        hidden_bpt = probe.layout.bytes_per_token(0, "H")
        rec = 1e-6
        profile = Profile(L, hidden_bpt, 2 * hidden_bpt, {"dram": hidden_bpt / rec, "nvme": hidden_bpt / rec},
                          (0.0, 1e-12), (0.0, rec, 0.0))
        hc = HCache(model, store, method="auto", chunk_tokens=C, profile=profile, plan="H" * L)
        ids = prompt(model, 40)
        hc.save(ids[:, :32])
        for _ in range(3):
            cache, n = hc.restore(ids)
            assert hc.last_restore.sources.get("dram", 0) > 0
            assert_cache_exact(model, cache, ids, n)
        assert hc.scheduler.nvme_efficiency == 1.0


def test_a_cached_manifest_made_stale_by_a_new_save_gives_a_miss_then_the_new_state(tmp_path):
    """hc keeps the manifests it found; the chunks are then saved anew with another plan (the old entries gone).
    The stale manifest names layer keys that are missing: one miss, never wrong state, and the next lookup
    reads the new manifest and restores exactly."""
    model = _build("llama_mha")
    L = model.config.num_hidden_layers
    ids = prompt(model, 40)
    with open_store(tmp_path / "s", dram=8 << 20) as store:
        hc = HCache(model, store, method="auto", chunk_tokens=C, plan="H" * L, namespace="n")
        hc.save(ids[:, :33])
        assert hc.restore(ids).tokens == 32 and hc.last_restore.plan == "H" * L
        for key in store.keys():
            store.delete(key)
        HCache(model, store, method="kv", chunk_tokens=C, namespace="n").save(ids[:, :33])
        assert hc.restore(ids).tokens == 0  # the cached plan's layer keys are gone: a miss
        cache, n = hc.restore(ids)
        assert n == 32 and hc.last_restore.plan == "K" * L
        assert_cache_exact(model, cache, ids, n)


def test_auto_that_learned_nvme_loses_decides_from_the_last_layer_yet_tries_again_and_sees_dram(tmp_path):
    """Once auto has learned that split restores from NVMe lose, a prefix wholly on NVMe is recomputed
    without locating every layer; every REPROBE_EVERY-th such restore still tries the profile's split
    (exact); and a prefix back in DRAM is located as usual."""
    from hcache_adapter.scheduler.auto import REPROBE_EVERY

    model = _build("llama_mha")
    L = model.config.num_hidden_layers
    with open_store(tmp_path / "s", dram=8 << 20) as store:
        probe = HCache(model, store, method="kv", chunk_tokens=C)
        hidden_bpt = probe.layout.bytes_per_token(0, "H")
        rec = 1e-6
        profile = Profile(L, hidden_bpt, 2 * hidden_bpt, {"dram": 100 * hidden_bpt / rec, "nvme": hidden_bpt / rec},
                          (0.0, 1e-12), (0.0, rec, 0.0))
        hc = HCache(model, store, method="auto", chunk_tokens=C, profile=profile, plan="H" * L)
        ids = prompt(model, 40)
        hc.save(ids[:, :32])
        store.flush()
        _restore_from_nvme_until_recomputed(hc, store, model, ids)
        assert hc.last_restore.recompute_layers == L and hc.scheduler.nvme_efficiency < 1.0
        splits = 0
        for _ in range(REPROBE_EVERY + 1):
            store.drop_cached()
            cache, n = hc.restore(ids)
            assert set(hc.last_restore.sources) == {"nvme"}
            if hc.last_restore.recompute_layers < L:
                splits += 1
                assert_cache_exact(model, cache, ids, n)
        assert splits >= 1  # tried again
        store.get_many(store.keys())  # read back into DRAM
        hc.restore(ids)
        assert "dram" in hc.last_restore.sources  # located, not guessed

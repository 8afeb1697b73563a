"""The same guarantees on a real GPU (skipped without CUDA): GPU tier, asynchronous
device-to-host puts, and HCache restores in float16 from DRAM and from NVMe."""
from __future__ import annotations

import pytest
import torch
from tests.helpers.caches import assert_holds_models_state

from hcache_adapter import HCache
from hcache_adapter.compat import cache_kwarg, new_cache
from hstore import StoreConfig, TieredStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_tier_promotes_and_serves_device_reads(tmp_path):
    cfg = StoreConfig(root=tmp_path, dram_bytes=8 << 20, nvme_bytes=64 << 20, gpu_bytes=4 << 20)
    with TieredStore(cfg) as store:
        values = {f"k{i}": torch.randn(64, 1024, device="cuda", dtype=torch.float16) for i in range(20)}
        for k, v in values.items():
            store.put(k, v, non_blocking=True)  # device -> pinned DRAM on a side stream
        store.flush()
        for k, v in values.items():
            got = store.get(k, device="cuda")
            assert got.is_cuda and torch.equal(got, v)
        assert store.stats()["tiers"]["gpu"]["promotions"] > 0
        assert store.locate(["k19"]) == ["gpu"]
        store.drop_cached()
        for k, v in values.items():  # from NVMe, through pinned staging, to the GPU
            assert torch.equal(store.get(k, device="cuda"), v)


def test_non_blocking_put_keeps_the_source_alive_until_copied(tmp_path):
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        expected = []
        for i in range(50):
            t = torch.full((1 << 18,), float(i), device="cuda")
            store.put(f"x{i}", t, non_blocking=True)
            expected.append(float(i))
            del t  # the allocator must not hand this memory out before the copy ran
            torch.empty(1 << 18, device="cuda").fill_(-1.0)
        for i, v in enumerate(expected):
            assert torch.all(store.get(f"x{i}") == v)


@pytest.mark.parametrize("source", ["dram", "nvme"])
@pytest.mark.parametrize("method", ["hcache", "kv", "auto"])
def test_restore_on_gpu_float16_matches_prefill(tmp_path, method, source):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=1024, vocab_size=1000)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=256 << 20)) as store:
        hc = HCache(model, store, method=method)
        ids = torch.randint(0, 1000, (1, 600), device="cuda")
        assert hc.save(ids[:, :512]) == 512
        store.flush()
        if source == "nvme":
            store.drop_cached()
        cache, n = hc.restore(ids)
        assert hc.last_restore.sources.get(source, 0) > 0
        if method == "auto" and n == 0:  # one prefill of 600 tokens of this small model beat loading, end to end
            assert hc.last_restore.recompute_layers == cfg.num_hidden_layers
            return
        assert n == 512
        ref = new_cache(model)
        with torch.no_grad():
            model.base_model(input_ids=ids[:, :n], use_cache=True, **{cache_kwarg(model.base_model): ref})
        err = max(max((a.keys - b.keys).abs().max().item(), (a.values - b.values).abs().max().item())
                  for a, b in zip(cache.layers, ref.layers))
        print(f"fp16 max abs error {method}/{source}: {err:.3e}")
        assert err < 5e-2
        gen = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(hc.generate(ids, **gen), model.generate(ids, **gen))


def test_graphed_restores_equal_ungraphed_ones_and_never_alias(tmp_path):
    """The second restore of a length replays CUDA graphs; K/V equal the non-graphed path's,
    and a later restore does not change the K/V an earlier one returned."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=1024, vocab_size=1000)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        plain = HCache(model, store, method="hcache", cuda_graphs=False)
        ids = torch.randint(0, 1000, (1, 600), device="cuda")
        plain.save(ids[:, :512])
        ref, n = plain.restore(ids)
        graphed = HCache(model, store, method="hcache", cuda_graphs=True)
        first, _ = graphed.restore(ids)  # counts the bucket
        second, _ = graphed.restore(ids)  # captures and replays
        snapshot = [(l.keys.clone(), l.values.clone()) for l in second.layers]
        third, _ = graphed.restore(ids)  # replays again into the same graph memory
        assert graphed.projector.graph_replays >= 2 * cfg.num_hidden_layers
        for a, b, (k, v), c in zip(ref.layers, second.layers, snapshot, third.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert torch.equal(b.keys, k) and torch.equal(b.values, v)  # untouched by the third restore
            assert torch.equal(c.keys, k) and torch.equal(c.values, v)
        gen = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(graphed.generate(ids, **gen), model.generate(ids, **gen))


def _tiny_gpu_model(kv_heads=4, dtype=torch.float32):
    from hcache_adapter.bench.models import build_model

    model = build_model("tiny-gqa" if kv_heads != 4 else "tiny", dtype=dtype, device="cuda")
    return model


GPU_MODES = {
    "greedy": dict(max_new_tokens=8, do_sample=False),
    "sampling": dict(max_new_tokens=8, do_sample=True, top_k=20),
    "beams": dict(max_new_tokens=6, num_beams=3, do_sample=False),
    "static_compiled": dict(max_new_tokens=8, do_sample=False, cache_implementation="static"),
    "offloaded": dict(max_new_tokens=8, do_sample=False, cache_implementation="offloaded"),
}


@pytest.mark.parametrize("mode", sorted(GPU_MODES))
@pytest.mark.parametrize("method", ["hcache", "kv"])
def test_gpu_generation_modes_restore_and_match(tmp_path, mode, method):
    """float32 on the GPU: the lazy restore on side streams, the captured prefill (graph replays from the
    second request of a length on), transformers' static compiled decode and its offloaded cache."""
    model = _tiny_gpu_model()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method=method)
        ids = torch.randint(10, 1000, (1, 300), device="cuda")
        gen = GPU_MODES[mode]
        for rnd in range(4):
            torch.manual_seed(rnd)
            out = hc.generate(ids, **gen)
            torch.manual_seed(rnd)
            ref = model.generate(ids, **gen)
            assert torch.equal(out, ref), f"round {rnd}"
            if rnd:
                assert hc.last_restore.tokens == 256
        if mode in ("greedy", "sampling"):
            assert hc.prefill is not None and hc.prefill.replays >= 1


@pytest.mark.parametrize("per", [1, 3])
def test_segmented_captured_prefill_gives_model_generate_tokens(tmp_path, per):
    """The captured prefill split into graphs of `per` layers, each replayed once its layers are restored:
    the same greedy tokens as model.generate, from the graph's second use on."""
    model = _tiny_gpu_model()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method="hcache")
        hc.prefill.segment_layers = per
        ids = torch.randint(10, 1000, (1, 300), device="cuda")
        gen = dict(max_new_tokens=8, do_sample=False)
        ref = model.generate(ids, **gen)
        for rnd in range(4):
            assert torch.equal(hc.generate(ids, **gen), ref), f"round {rnd}"
        assert hc.prefill.replays >= 2 and hc.prefill.captures == 1


@pytest.mark.parametrize("method", ["hcache", "kv"])
def test_restore_into_the_captured_prefills_static_cache(tmp_path, method):
    """On a GPU the restore's writes into the bucket are queued before the forward: a cache an earlier
    call returned (graph memory of the same bucket) still reads its own K/V, and tokens match."""
    model = _tiny_gpu_model()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method=method)
        gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
        ids = torch.randint(10, 1000, (1, 300), device="cuda")
        other = torch.randint(10, 1000, (1, 300), device="cuda")
        for _ in range(3):
            assert torch.equal(hc.generate(ids, **gen), model.generate(ids, **gen))
        held = hc.generate(ids, **gen, return_dict_in_generate=True)
        assert hc.prefill.in_place > 0
        for _ in range(2):
            assert torch.equal(hc.generate(other, **gen), model.generate(other, **gen))
        assert_holds_models_state(model, held.past_key_values, held.sequences[:, :-1], atol=1e-4)


@pytest.mark.parametrize("heads", [False, True])
def test_projection_graphs_write_into_the_static_cache_padding_included(tmp_path, heads):
    """320 restored tokens project in a graph of 512 rows: from the destination's second use the graph writes
    K/V (and its padding rows, which the forward overwrites or masks) into the captured prefill's static cache
    itself. Tokens and the returned cache's state match the model's, per-head GEMMs (`heads`) or not."""
    model = _tiny_gpu_model()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method="hcache")
        hc.projector.write_in_place = True
        hc.projector.heads_gemm = heads
        gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
        ids = torch.randint(10, 1000, (1, 340), device="cuda")
        for _ in range(4):
            assert torch.equal(hc.generate(ids, **gen), model.generate(ids, **gen))
        held = hc.generate(ids, **gen, return_dict_in_generate=True)
        assert hc.last_restore.tokens == 320
        assert hc.projector.direct_graph_replays > 0
        assert_holds_models_state(model, held.past_key_values, held.sequences[:, :-1], atol=1e-4)


def test_projection_graphs_read_the_loaded_hidden_state_in_place(tmp_path):
    """256 restored tokens fill a 256-row bucket exactly: the graphs that write into the captured prefill's
    static cache read each layer's hidden state in the loader's slot (no copy into the graph's input), and a
    layer lands in the same slot every call, so no graph is captured after the second call. Tokens and the
    returned cache's state are the model's."""
    model = _tiny_gpu_model()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method="hcache")
        gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
        ids = torch.randint(10, 1000, (1, 300), device="cuda")
        hc.save(ids[:, :257])
        ref = model.generate(ids, **gen)
        for _ in range(2):
            assert torch.equal(hc.generate(ids, **gen), ref)
        captures, before = hc.projector.graph_captures, hc.projector.in_place_input_replays
        for _ in range(2):
            assert torch.equal(hc.generate(ids, **gen), ref)
        held = hc.generate(ids, **gen, return_dict_in_generate=True)
        assert hc.last_restore.tokens == 256
        assert hc.projector.in_place_input_replays - before == 3 * model.config.num_hidden_layers
        assert hc.projector.graph_captures == captures
        assert_holds_models_state(model, held.past_key_values, held.sequences[:, :-1], atol=1e-4)

        other = HCache(model, store, method="hcache", namespace="copying")
        other.projector.read_in_place = False  # read when its graphs are made: they copy the hidden state in
        other.save(ids[:, :257])
        for _ in range(3):
            assert torch.equal(other.generate(ids, **gen), ref)
        assert other.projector.direct_graph_replays > 0 and other.projector.in_place_input_replays == 0


@pytest.mark.parametrize("method", ["hcache", "auto"])
def test_every_capture_happens_by_the_second_call_of_a_length(tmp_path, method):
    """A length's graphs (the captured prefill, and the restore's projections written into its static
    cache) are all captured by its second generate(): later calls only replay them. A capture in a later
    call is a hitch the user sees (the H200's bench: the fourth call took 0.2-1.4 s). Tokens stay the model's."""
    model = _tiny_gpu_model()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method=method)
        ids = torch.randint(10, 1000, (1, 340), device="cuda")
        hc.save(ids[:, :321])
        gen = dict(max_new_tokens=1, do_sample=False)
        ref = model.generate(ids, **gen)
        for _ in range(2):
            assert torch.equal(hc.generate(ids, **gen), ref)
        captured = (hc.prefill.captures, hc.projector.graph_captures)
        direct = hc.projector.direct_graph_replays
        for _ in range(3):
            assert torch.equal(hc.generate(ids, **gen), ref)
        assert hc.last_restore.tokens == 320
        assert (hc.prefill.captures, hc.projector.graph_captures) == captured
        assert hc.projector.direct_graph_replays - direct == 3 * hc.last_restore.plan.count("H")


def test_captured_prefill_float16_error_and_tokens_on_the_7b_layer_shape(tmp_path):
    """Two layers of the Llama-2-7B shape in float16: the captured prefill's logits against the eager
    prefill's over the same restored cache (reported), and greedy tokens against model.generate."""
    from hcache_adapter.bench.models import build_model

    model = build_model("llama2-7b", dtype=torch.float16, device="cuda", layers=2, max_positions=4096)
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=1 << 30, nvme_bytes=0)) as store:
        hc = HCache(model, store, method="hcache")
        ids = torch.randint(10, 32000, (1, 1024 + 32), device="cuda")
        hc.save(ids[:, :1025])
        gen = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
        outs = [hc.generate(ids, **gen) for _ in range(3)]
        assert hc.prefill.replays >= 1
        ref = model.generate(ids, **gen)
        err = (outs[-1].scores[0] - ref.scores[0]).abs().max().item()
        print(f"captured prefill fp16 max abs logit error vs model.generate: {err:.3e}")
        assert err < 0.1


@pytest.mark.parametrize("ahead", [1, 1 << 30, None])
def test_restore_issued_ahead_of_the_layer_the_model_takes(tmp_path, ahead):
    """A memory-tier restore queues only `issue_ahead_bytes` of its layers before generate() runs and the
    rest as the model takes layers: with a budget of one byte (one layer ahead), of everything, or measured
    (the default: generate()'s set-up is measured), the restored cache and generate()'s tokens are those of
    the model."""
    model = _tiny_gpu_model()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method="hcache")
        hc.restorer.issue_ahead_bytes = ahead
        ids = torch.randint(10, 1000, (1, 300), device="cuda")
        hc.save(ids[:, :257])
        result = hc.restore(ids, lazy=True)
        assert_holds_models_state(model, result.cache.materialize(), ids[:, : result.tokens], atol=1e-2)
        gen = dict(max_new_tokens=4, do_sample=False)
        for _ in range(3):  # eager forward, then the captured one
            assert torch.equal(hc.generate(ids, **gen), model.generate(ids, **gen))
        if ahead is None:
            assert 0 <= hc.restorer.issue_ahead.setup_s < 1.0


def test_plans_starting_with_kv_layers_project_from_graphs(tmp_path):
    """A plan whose first layers are K/V projects no layer 0: the projection graphs are still captured
    (counted per layer) and replayed, and tokens match model.generate."""
    model = _tiny_gpu_model()
    layers = model.config.num_hidden_layers
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method="auto", plan="K" + "H" * (layers - 1))
        ids = torch.randint(10, 1000, (1, 300), device="cuda")
        gen = dict(max_new_tokens=4, do_sample=False)
        for _ in range(3):
            assert torch.equal(hc.generate(ids, **gen), model.generate(ids, **gen))
        assert hc.projector.graph_replays > 0


@pytest.mark.parametrize("method", ["hcache", "kv"])
def test_reads_started_before_the_lookup_finished(tmp_path, method):
    """`Restorer.begin` queues the first layers' copies (inline, on the copy stream) before the lookup has
    located the rest: a lazy restore that agrees takes them over, one that cuts the prefix cancels them,
    and generate()'s tokens are the model's either way (eager forward, then the captured one)."""
    from hcache_adapter.keys import layer_key
    from hcache_adapter.scheduler.planner import min_recompute

    model = _tiny_gpu_model()
    with TieredStore(StoreConfig(root=tmp_path, dram_bytes=64 << 20, nvme_bytes=0)) as store:
        hc = HCache(model, store, method=method)
        hc.restorer.early_min_keys = 1
        ids = torch.randint(10, 1000, (1, 300), device="cuda")
        hc.save(ids[:, :257])
        digests, plan = hc.digests(ids[0, :256]), hc.save_plan()
        early = hc.restorer.begin(digests, plan, min_recompute(plan))
        assert early is not None and early.loader.inline
        cache, valid, release = hc.restorer.restore(ids, digests, plan, min_recompute(plan), lazy=True, early=early)
        assert early.taken and valid == len(digests)
        assert_holds_models_state(model, cache.materialize(), ids[:, :256], atol=1e-2)
        release()
        gen = dict(max_new_tokens=4, do_sample=False)
        for _ in range(3):
            assert torch.equal(hc.generate(ids, **gen), model.generate(ids, **gen))
            assert hc.last_restore.tokens == 256
        kind = "h" if method == "hcache" else "kv"
        store.delete(layer_key(hc.namespace, digests[2], kind, model.config.num_hidden_layers - 1))
        for restored in (2 * 64, 256):  # the prefix cut at the missing chunk, which that call saved again
            assert torch.equal(hc.generate(ids, **gen), model.generate(ids, **gen))
            assert hc.last_restore.tokens == restored

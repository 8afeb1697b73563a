"""HCache projection against the models' own KV cache, one tiny random model per architecture.

Each case runs one prefill with a DynamicCache, captures every decoder layer's
input hidden state with forward pre-hooks, projects it, and compares with the K
and V that the model's attention stored.  Runs with transformers 5.17 and 5.24.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import BloomConfig, BloomForCausalLM, DynamicCache

from tests.helpers.models import ATOL, BATCH, CASES, D, HD, HEADS, LAYERS, SEQ, VOCAB, build

from hcache_adapter.projection import GenericProjector, Projector, projector_for, register, supported_model_types

def _cache_kwarg(model: torch.nn.Module) -> str:
    """5.24 names it `cache` (`past_key_values` is a deprecated alias); 5.17 `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model, proj: Projector, input_ids):
    """The model's cached K/V per layer and each decoder layer's input hidden state."""
    hidden: dict[int, torch.Tensor] = {}

    def capture(idx):
        def hook(_module, args, kwargs):
            hidden[idx] = Projector.hidden_from_call(args, kwargs).detach().clone()

        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True)
               for i, layer in enumerate(proj.decoder_layers)]
    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids, use_cache=True, **{_cache_kwarg(model): cache})
    finally:
        for h in handles:
            h.remove()
    return [(layer.keys, layer.values) for layer in cache.layers], hidden


def _max_errors(model, proj, input_ids):
    cached, hidden = _prefill(model, proj, input_ids)
    assert len(cached) == proj.num_layers == len(hidden)
    b, t = input_ids.shape
    position_ids = torch.arange(t).expand(b, t)
    errors = []
    for i, (k_ref, v_ref) in enumerate(cached):
        k, v = proj.project(i, hidden[i], position_ids)
        expected = (b, proj.num_kv_heads(i), t, proj.head_dim(i))
        assert tuple(k.shape) == tuple(k_ref.shape) == expected, (i, k.shape, k_ref.shape)
        assert tuple(v.shape) == tuple(v_ref.shape) == expected, (i, v.shape, v_ref.shape)
        assert k.dtype == k_ref.dtype and v.dtype == v_ref.dtype
        assert not k.requires_grad and not v.requires_grad
        errors.append(max((k - k_ref).abs().max().item(), (v - v_ref).abs().max().item()))
    return errors


def _input_ids():
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_projection_matches_model_cache(name, record_property):
    model = build(name)
    proj = projector_for(model)
    assert proj is not None
    errors = _max_errors(model, proj, _input_ids())
    record_property("max_abs_error", max(errors))
    print(f"{name}: transformers {transformers.__version__} max abs error {max(errors):.3g}")
    assert max(errors) <= ATOL, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_projection_is_bit_exact_on_cuda(name, dtype):
    """In half precision on CUDA the projection reproduces the cache bit for bit (H100, 5.17).

    This is what catches a GEMM that rounds differently from the model's own
    (e.g. a fused bias add where FalconLinear adds the bias after the product).
    """
    model = build(name, dtype).cuda()
    proj = projector_for(model)
    cached, hidden = _prefill(model, proj, _input_ids().cuda())
    position_ids = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
    for i, (k_ref, v_ref) in enumerate(cached):
        k, v = proj.project(i, hidden[i], position_ids)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref), i


@pytest.mark.parametrize("name", sorted(CASES))
def test_project_runs_only_kv_gemms(name):
    """GEMM FLOPs are exactly those of K and V: no query projection (a few rotary FLOPs in 5.17 aside)."""
    model = build(name)
    proj = projector_for(model)
    case = CASES[name]
    assert proj.num_kv_heads() == case.cache_heads
    hidden = torch.randn(BATCH, SEQ, D)
    with FlopCounterMode(display=False) as counter:
        proj.project(0, hidden, torch.arange(SEQ).expand(BATCH, SEQ))
    kv_flops = 2 * BATCH * SEQ * D * (2 * case.kv_groups * proj.head_dim())
    one_head_flops = 2 * BATCH * SEQ * D * proj.head_dim()
    assert kv_flops <= counter.get_total_flops() < kv_flops + one_head_flops


@pytest.mark.parametrize("name", sorted(CASES))
def test_query_weights_are_never_read(name):
    """Poisoning the query rows with NaN leaves the projection intact."""
    model = build(name)
    proj = projector_for(model)
    input_ids = _input_ids()
    cached, hidden = _prefill(model, proj, input_ids)
    with torch.no_grad():
        for layer in proj.decoder_layers:
            weight, rows = CASES[name].query_rows(layer)
            weight[rows] = float("nan")
    for i, (k_ref, v_ref) in enumerate(cached):
        k, v = proj.project(i, hidden[i], torch.arange(SEQ).expand(BATCH, SEQ))
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
        assert (k - k_ref).abs().max() <= ATOL and (v - v_ref).abs().max() <= ATOL


@pytest.mark.parametrize("name", ["phi3_gqa", "gpt_neox_partial_rotary", "falcon_new_arch_2ln", "gpt2"])
def test_fused_weight_selection_follows_the_module(name):
    """The cached K/V weight selection is rebuilt after `.to()` and after an in-place edit."""
    model = build(name)
    proj = projector_for(model)
    input_ids = _input_ids()
    assert max(_max_errors(model, proj, input_ids)) <= ATOL  # fills the selection cache
    model.to(torch.float64)
    assert max(_max_errors(model, proj, input_ids)) <= 1e-12
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.5)
    assert max(_max_errors(model, proj, input_ids)) <= 1e-12


class _OwnForwardLinear(torch.nn.Linear):
    """A Linear whose forward the projector does not know (as a quantized Linear's)."""

    def forward(self, x):
        return super().forward(x)


def test_fused_module_with_unknown_forward_runs_whole():
    """A fused module that cannot be sliced is run whole and its K/V features selected."""
    model = build("phi3_gqa")
    proj = projector_for(model)
    for layer in proj.decoder_layers:
        layer.self_attn.qkv_proj.__class__ = _OwnForwardLinear
    assert max(_max_errors(model, proj, _input_ids())) <= ATOL
    with FlopCounterMode(display=False) as counter:
        proj.project(0, torch.randn(BATCH, SEQ, D))
    assert counter.get_total_flops() >= 2 * BATCH * SEQ * D * model.config.num_attention_heads * HD


def test_base_model_is_accepted():
    model = build("llama_gqa")
    base = model.model
    proj = projector_for(base)
    assert proj is not None and proj.decoder_layers == projector_for(model).decoder_layers
    errors = _max_errors(base, proj, _input_ids())
    assert max(errors) <= ATOL


def test_position_ids_default_to_a_prefix_from_zero():
    model = build("qwen3_gqa_knorm")
    proj = projector_for(model)
    cached, hidden = _prefill(model, proj, _input_ids())
    k, v = proj.project(1, hidden[1])
    assert (k - cached[1][0]).abs().max() <= ATOL and (v - cached[1][1]).abs().max() <= ATOL


def test_a_family_without_a_fast_path_gets_the_generic_projection():
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=D, n_layer=LAYERS, n_head=HEADS)).eval()
    assert "bloom" not in supported_model_types()
    proj = projector_for(bloom)
    assert isinstance(proj, GenericProjector)
    assert max(_max_errors(bloom, proj, _input_ids())) <= ATOL
    assert projector_for(torch.nn.Linear(2, 2)) is None


def test_registry():
    types = supported_model_types()
    for t in ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "opt", "gpt_neox", "falcon"]:
        assert t in types
    assert types == sorted(types)
    with pytest.raises(ValueError):
        register("llama")(type("Other", (Projector,), {}))
    with pytest.raises(ValueError):
        register()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_token(dtype):
    item = torch.empty((), dtype=dtype).element_size()
    expectations = {  # name: kv heads in the cache
        "llama_mha": HEADS, "llama_gqa": 2, "gemma_mqa": 1, "gpt2": HEADS, "opt_post_ln": HEADS,
        "falcon_multi_query_rotary": 1, "falcon_new_arch_2ln": CASES["falcon_new_arch_2ln"].cache_heads,
    }
    for name, kv_heads in expectations.items():
        proj = projector_for(build(name, dtype))
        assert proj.dtype == dtype
        assert proj.num_layers == LAYERS and proj.hidden_size == D
        for layer in range(proj.num_layers):
            assert proj.head_dim(layer) == HD
            assert proj.hidden_bytes_per_token(layer) == D * item
            assert proj.kv_bytes_per_token(layer) == 2 * kv_heads * HD * item
        if kv_heads == HEADS:  # MHA: the hidden state is half of K+V
            assert 2 * proj.hidden_bytes_per_token() == proj.kv_bytes_per_token()


def test_batch_rows_are_independent():
    """Projecting a batch of 2 equals projecting each row alone."""
    model = build("gpt_neox_partial_rotary")
    proj = projector_for(model)
    _, hidden = _prefill(model, proj, _input_ids())
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    k, v = proj.project(1, hidden[1], pos)
    for row in range(BATCH):
        k1, v1 = proj.project(1, hidden[1][row : row + 1], pos[row : row + 1])
        assert torch.allclose(k[row : row + 1], k1, atol=ATOL) and torch.allclose(v[row : row + 1], v1, atol=ATOL)


def test_bad_arguments():
    proj = projector_for(build("llama_gqa"))
    with pytest.raises(IndexError):
        proj.project(LAYERS, torch.zeros(1, 2, D))
    with pytest.raises(ValueError):
        proj.project(0, torch.zeros(2, D))
    assert math.isfinite(proj.kv_bytes_per_token())


@pytest.mark.parametrize("name", ["llama_mha", "llama_gqa", "llama_mqa_bias", "mistral_gqa", "qwen2_gqa_bias",
                                  "qwen3_gqa_knorm", "gemma_mqa"])
def test_llama_family_projects_through_the_tensor_function(name):
    """The known RMSNorms are reproduced op for op, so the fast tensors-only path is taken (and is exact)."""
    model = build(name)
    proj = projector_for(model)
    assert proj.uses_tensor_path
    assert max(_max_errors(model, proj, _input_ids())) <= ATOL


class _ScaledNorm(torch.nn.Module):
    """A pre-attention norm hcache has no copy of: it must be called as the module it is."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2.0 * self.inner(x)


def test_unknown_norm_is_called_as_a_module_and_stays_exact():
    model = build("llama_gqa")
    for layer in model.model.layers:
        layer.input_layernorm = _ScaledNorm(layer.input_layernorm)
    proj = projector_for(model)
    assert not proj.uses_tensor_path
    assert max(_max_errors(model, proj, _input_ids())) <= ATOL


def test_graph_buckets_pad_by_at_most_a_quarter_and_are_few():
    from hcache_adapter.projection.graphs import bucket_rows

    seen = set()
    for n in range(1, 20000, 7):
        b = bucket_rows(n)
        assert b >= n and b % 256 == 0
        assert b - n < max(256, n // 4 + 1)
        seen.add(b)
    assert bucket_rows(4096) == 4096 and bucket_rows(1024) == 1024 and bucket_rows(8192) == 8192
    assert len(seen) < 60  # ~4 per doubling of the length

"""What each rank of the tensor-parallel tests runs (module-level functions: spawned processes import them).

A tiny Llama is saved with `save_pretrained` to a temporary folder
(`save_tiny_llama`) and every rank loads it with transformers' own
tensor-parallel plan. Each rank returns plain data (token lists, errors,
counts) for the test process to compare with the unsharded model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hcache_adapter import HCache
from hcache_adapter.compat import layer_kv
from hcache_adapter.parallel.stores import NodeStores
from hcache_adapter.parallel.tp import load_tensor_parallel
from hstore import StoreConfig, TieredStore

CHUNK = 16
NEW_TOKENS = 4
# 4 heads (MHA) split over 2 or 4 ranks; 3 layers so plans can mix kinds.
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DRAM_ONLY = dict(dram_bytes=16 << 20, nvme_bytes=0, io_engine="threads", io_threads=2)
WITH_NVME = dict(dram_bytes=16 << 20, nvme_bytes=32 << 20, io_engine="threads", io_threads=2)


def save_tiny_llama(path: Path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():  # norms away from 1, so a projection that skipped one would show
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(path)


def load_unsharded(path: Path) -> torch.nn.Module:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompts(lengths: tuple[int, ...] = (40, 70)) -> list[torch.Tensor]:
    """Prompts that extend one another (the second restores the first's whole chunks)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, CONFIG["vocab_size"], (1, max(lengths)), generator=g)
    return [ids[:, :n] for n in lengths]


def generate(hc_or_model, ids: torch.Tensor) -> list[int]:
    out = hc_or_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def shard_error(model, cache, ids: torch.Tensor, tokens: int) -> float:
    """Largest difference between a restored cache and the model's own prefill of the same tokens (this
    rank's shard of both, under tensor parallelism); 0 when nothing was restored."""
    if tokens == 0:
        return 0.0
    own = model(ids[:, :tokens], use_cache=True).past_key_values
    err = 0.0
    for layer in range(model.config.num_hidden_layers):
        for got, want in zip(layer_kv(cache, layer), layer_kv(own, layer)):
            assert got.shape == want.shape, (layer, got.shape, want.shape)
            err = max(err, (got - want).abs().max().item())
    return err


def hidden_keys(store) -> int:
    return sum(1 for k in store.keys() if b"/h" in k)


def methods_rank(rank: int, world: int, model_dir: str, root: str, methods: tuple[str, ...]) -> dict:
    """Every method on the tensor-parallel model: save with one prompt, restore under a longer one.
    A method "auto:HKH" is auto with that explicit plan."""
    model = load_tensor_parallel(LlamaForCausalLM, model_dir, dtype=torch.float32).eval()
    first, second = prompts()
    out = {}
    for name in methods:
        method, _, plan = name.partition(":")
        with TieredStore(StoreConfig(root=Path(root) / name.replace(":", "-") / f"slot{rank}", **DRAM_ONLY)) as store:
            hc = HCache(model, store, method=method, chunk_tokens=CHUNK, plan=plan or None)
            tokens = [generate(hc, first), generate(hc, second)]
            restored_by_generate = hc.last_restore.tokens
            result = hc.restore(second)
            out[name] = dict(tokens=tokens, generate_restored=restored_by_generate, restored=result.tokens,
                               plan=hc.save_plan(), error=shard_error(model, result.cache, second, result.tokens),
                               hidden_keys=hidden_keys(store), kv_heads=hc.layout.kv_heads[0])
    return out


def save_rank(rank: int, world: int, model_dir: str, node_root: str, slots: int, method: str) -> dict:
    """Save the longer prompt's state with `method` into this rank's slot of a node's stores (on NVMe)."""
    model = load_tensor_parallel(LlamaForCausalLM, model_dir, dtype=torch.float32).eval()
    return save_into(model, NodeStores.open(node_root, slots=slots, world=world, rank=rank, config=nvme_config),
                     method)


def save_into(model, stores: NodeStores, method: str) -> dict:
    with stores:
        hc = HCache(model, stores, method=method, chunk_tokens=CHUNK)
        tokens = generate(hc, prompts()[1])
        stores.flush()
        return dict(tokens=tokens, hidden_keys=hidden_keys(stores.own))


def restore_rank(rank: int, world: int, model_dir: str, jobs: list[dict]) -> list[dict]:
    """Restore what other degrees saved, job by job: {node_root, slots, method, drop}. `drop`: a (layer,
    chunk) whose hidden state this rank deletes from its own store after a first restore, before a second."""
    model = load_tensor_parallel(LlamaForCausalLM, model_dir, dtype=torch.float32).eval()
    out = []
    for job in jobs:
        stores = NodeStores.open(job["node_root"], slots=job["slots"], world=world, rank=rank, config=nvme_config)
        out.append(restore_from(model, stores, job["method"], job.get("drop")))
    return out


def restore_from(model, stores: NodeStores, method: str = "hcache", drop: tuple[int, int] | None = None) -> dict:
    ids = prompts()[1]
    with stores:
        hc = HCache(model, stores, method=method, chunk_tokens=CHUNK)
        runs = [_restore_and_generate(model, hc, ids)]
        if drop is not None:
            layer, chunk = drop
            key = hc.layout.chunk_key(hc.layout.digests(ids)[chunk], "H", layer)
            runs[0]["dropped"] = stores.own.delete(key)
            runs.append(_restore_and_generate(model, hc, ids))
        return dict(runs=runs, hidden_keys=hidden_keys(stores.own))


def _restore_and_generate(model, hc, ids) -> dict:
    result = hc.restore(ids)
    error = shard_error(model, result.cache, ids, result.tokens)
    tokens = generate(hc, ids)
    return dict(restored=result.tokens, error=error, tokens=tokens, generate_restored=hc.last_restore.tokens)


def nvme_config(root: Path) -> StoreConfig:
    return StoreConfig(root=root, **WITH_NVME)


def remote_rank(rank: int, world: int, model_dir: str, root: str, url: str) -> dict:
    """Save through a shared remote tier (this rank's own root, DRAM only), close, then restore with a fresh
    root: everything read comes from the remote, each rank reading its share."""
    model = load_tensor_parallel(LlamaForCausalLM, model_dir, dtype=torch.float32).eval()
    saved = save_into(model, NodeStores([TieredStore(remote_config(Path(root) / f"save{rank}", url))]), "hcache")
    back = restore_from(model, NodeStores([TieredStore(remote_config(Path(root) / f"fresh{rank}", url))]))
    return dict(saved=saved, back=back)


def remote_config(root: Path, url: str) -> StoreConfig:
    return StoreConfig(root=root, remote=url, **DRAM_ONLY)

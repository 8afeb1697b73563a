"""HCache on a model split by transformers' tensor parallelism: 2 and 4 CPU processes under gloo.

A tiny Llama is saved to a temporary folder and loaded in every rank with
`tp_plan="auto"` (transformers' own sharding: DTensor weights, each rank
caching its own K/V heads). Checked against the unsharded model: the tokens
hc.generate gives for every method, the restored K/V shards against the
model's own prefill, one stored copy of each hidden-state chunk, and a state
saved at one degree (4, or one process) restored at another (2, one process).
"""
from __future__ import annotations

import pytest

from hcache_adapter.parallel.stores import NodeStores
from hstore import TieredStore
from tests.helpers import tp_ranks as T
from tests.helpers.distributed import run_ranks

pytest.importorskip("accelerate", reason="transformers loads tp_plan models only with accelerate")

ATOL = 1e-5
CHUNKS = (T.prompts()[1].shape[1] - 1) // T.CHUNK  # whole chunks of the longer prompt
LAYERS = T.CONFIG["num_hidden_layers"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    T.save_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """The unsharded model's tokens for the two prompts."""
    model = T.load_unsharded(model_dir)
    return [T.generate(model, ids) for ids in T.prompts()]


def check_methods(results: list[dict], reference, world: int) -> None:
    for rank, by_method in enumerate(results):
        for method, got in by_method.items():
            where = f"rank {rank}/{world}, {method}"
            assert got["tokens"] == reference, where
            assert got["kv_heads"] == T.CONFIG["num_key_value_heads"] // world, where
            assert got["error"] <= ATOL, where
            if method == "recompute":
                assert got["generate_restored"] == 0, where
            else:
                assert got["generate_restored"] == 2 * T.CHUNK, where  # the first prompt's whole chunks
                assert got["restored"] == CHUNKS * T.CHUNK, where
    for method in results[0]:
        if "H" in results[0][method]["plan"]:  # saved once: the ranks' stores together hold one copy
            per_rank = [r[method]["hidden_keys"] for r in results]
            assert sum(per_rank) == CHUNKS * results[0][method]["plan"].count("H"), (method, per_rank)
            assert max(per_rank) - min(per_rank) <= LAYERS, (method, per_rank)  # split evenly by chunk


@pytest.mark.slow
def test_two_ranks_every_method(model_dir, reference, tmp_path):
    results = run_ranks(2, T.methods_rank, str(model_dir), str(tmp_path), ("recompute", "kv", "hcache", "auto"))
    check_methods(results, reference, 2)


@pytest.fixture(scope="module")
def saved_at_four(model_dir, tmp_path_factory):
    """4 ranks: every method (auto with a mixed plan), then the longer prompt saved into two nodes' stores:
    hidden states (hcache) and K/V shards (kv)."""
    root = tmp_path_factory.mktemp("tp4")
    methods = T.methods_rank  # one spawn does both: starting 4 processes is the slow part
    results = run_ranks(4, _four_rank_job, str(model_dir), str(root))
    return root, results


def _four_rank_job(rank: int, world: int, model_dir: str, root: str) -> dict:
    from pathlib import Path

    methods = T.methods_rank(rank, world, model_dir, str(Path(root) / "methods"), ("recompute", "kv", "hcache",
                                                                                   "auto:HKH"))
    hidden = T.save_rank(rank, world, model_dir, str(Path(root) / "hidden"), world, "hcache")
    kv = T.save_rank(rank, world, model_dir, str(Path(root) / "kv"), world, "kv")
    return dict(methods=methods, hidden=hidden, kv=kv)


@pytest.mark.slow
def test_four_ranks_every_method(saved_at_four, reference):
    _, results = saved_at_four
    check_methods([r["methods"] for r in results], reference, 4)
    assert [r["hidden"]["hidden_keys"] for r in results] == [LAYERS] * CHUNKS  # chunk c saved by rank c % 4
    assert all(r["hidden"]["tokens"] == reference[1] for r in results)


@pytest.mark.slow
def test_state_saved_at_one_degree_restores_at_another(saved_at_four, model_dir, reference, tmp_path):
    root, _ = saved_at_four
    # One process saves (its node's slot 0 alone holds the state), to be restored at TP=2 below.
    one = T.load_unsharded(model_dir)
    single = T.save_into(one, NodeStores.open(tmp_path / "single", slots=1, world=1, rank=0,
                                              config=T.nvme_config), "hcache")
    assert single["tokens"] == reference[1] and single["hidden_keys"] == CHUNKS * LAYERS

    jobs = [dict(node_root=str(root / "hidden"), slots=4, method="hcache"),   # TP=4 -> TP=2
            dict(node_root=str(root / "kv"), slots=4, method="kv"),           # K/V shards of TP=4: not usable
            dict(node_root=str(tmp_path / "single"), slots=1, method="hcache", drop=(1, 2))]  # 1 -> TP=2
    at_two = run_ranks(2, T.restore_rank, str(model_dir), jobs)
    full = CHUNKS * T.CHUNK
    for rank, (hidden, kv, from_one) in enumerate(at_two):
        for run in hidden["runs"] + kv["runs"] + from_one["runs"]:
            assert run["tokens"] == reference[1], rank
            assert run["error"] <= ATOL, rank
        assert hidden["runs"][0]["restored"] == full and hidden["runs"][0]["generate_restored"] == full
        assert kv["runs"][0]["restored"] == 0  # another degree's K/V shards are never served
        first, after_drop = from_one["runs"]
        assert first["restored"] == full  # rank 1 holds nothing: rank 0 reads all, the gather shares it
        # Rank 0 lost layer 1's chunk 2: every rank cuts the prefix there, and generate recomputes layer 1.
        assert after_drop["restored"] == 2 * T.CHUNK and after_drop["generate_restored"] == full
    assert [r[2]["runs"][0].get("dropped") for r in at_two] == [True, False]

    # TP=4 -> one process: the unsharded model reads every slot of the node.
    back = T.restore_from(one, NodeStores.open(root / "hidden", slots=4, world=1, rank=0, config=T.nvme_config))
    run, = back["runs"]
    assert run["restored"] == full and run["error"] <= ATOL and run["tokens"] == reference[1]


@pytest.mark.slow
def test_ranks_share_state_through_the_remote_tier(model_dir, reference, tmp_path, redis_fresh):
    """The deployment story: every rank's store has the same Redis server; TP=2 saves, fresh stores at TP=2
    and one process restore."""
    url = redis_fresh.url()
    full = CHUNKS * T.CHUNK
    for rank, got in enumerate(run_ranks(2, T.remote_rank, str(model_dir), str(tmp_path), url)):
        assert got["saved"]["tokens"] == reference[1], rank
        assert got["saved"]["hidden_keys"] == CHUNKS // 2 * LAYERS, rank  # one copy between the two ranks
        run, = got["back"]["runs"]
        assert run["restored"] == full and run["error"] <= ATOL and run["tokens"] == reference[1], rank
    one = T.load_unsharded(model_dir)

    back = T.restore_from(one, NodeStores([TieredStore(T.remote_config(tmp_path / "single", url))]))
    run, = back["runs"]
    assert run["restored"] == full and run["error"] <= ATOL and run["tokens"] == reference[1]

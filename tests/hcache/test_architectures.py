"""Every decoder-only causal-LM family of transformers through HCache (tests/helpers/sweep.py does the work).

The default run checks a sample that covers each way a family is served (fast
path, generic projection of sliding / latent / linear-attention / shared
layers, K/V, recompute, refused); the whole library runs under ``-m sweep``
(CI runs both), in two worker processes, and writes its table next to the test
log.  Targets (issue 9): no failures, and at least 90% of the buildable
families served by hidden-state restore (see HIDDEN_SHARE).
"""
from __future__ import annotations

import os
import time

import pytest

from tests.helpers.models import causal_lm_types
from tests.helpers.sweep import NOT_BUILDABLE, check_family, counts, document, run_sweep

SAMPLE = [
    "llama",  # fast path
    "gpt2",  # fast path, fused Conv1D qkv, learned positions
    "bloom",  # generic: ALiBi, fused qkv
    "gemma3_text",  # generic: sliding windows, per-layer-type rotary, q/k norms
    "deepseek_v3",  # generic: latent attention (cache of a compressed latent)
    "qwen3_next",  # generic: linear-attention (conv + recurrent) layers beside attention
    "nemotron_h",  # generic: mamba, MLP-only (no cache) and attention layers
    "bert",  # generic: an encoder used as a decoder
    "mamba",  # generic: recurrent layers only (generate() is given the tokens after the restored cache)
    "jamba",  # generic: mamba + attention; the tail after a restore goes one token at a time
    "longcat_flash",  # generic: two cache layers per decoder block
    "recurrent_gemma",  # recompute: it keeps its recurrent state on its modules, not in its cache
    "openai-gpt",  # recompute: no cache at all
    "minimax",  # refused: a cache class of its own
    "prophetnet",  # not buildable
]
# Issue 9 asks for 90%: 155 of 171 buildable families with transformers 5.24 (91%), the hyper-connection
# families (deepseek_v4, hy_v4) included: the saver keeps their [streams, hidden] inputs as flat rows.
HIDDEN_SHARE = 0.90


@pytest.mark.parametrize("family", SAMPLE)
def test_family_is_served_exactly(family):
    row = check_family(family)
    assert not row.problems, (row.served_by, row.reason, row.problems)
    if row.served_by == "hidden":
        assert row.max_error is not None and row.max_error <= 1e-5
        assert row.restored_tokens[0] == 0 and 0 < row.restored_tokens[1] < row.restored_tokens[2]
    else:
        assert row.reason  # one clear reason whenever it is not hidden-state restore


@pytest.mark.sweep
def test_every_family_of_the_library(tmp_path):
    jobs = int(os.environ.get("HCACHE_SWEEP_JOBS", "2"))
    t0 = time.perf_counter()
    rows = run_sweep(causal_lm_types(), jobs)
    seconds = time.perf_counter() - t0
    (tmp_path / "architectures.md").write_text(document(rows, None, seconds, jobs))
    c = counts(rows)
    print(f"sweep: {c} in {seconds:.0f} s ({jobs} processes); table: {tmp_path / 'architectures.md'}")
    failed = {r.family: r.problems for r in rows if r.problems}
    assert not failed, failed
    built = len(rows) - c.get(NOT_BUILDABLE, 0)
    assert c.get("hidden", 0) >= HIDDEN_SHARE * built, c

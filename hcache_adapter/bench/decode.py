"""Decoding while saving: the time between tokens with HCache's two-stage save, against plain decoding,
and a multi-round chat whose every round is checked against the model's own generate.

Decoding with transformers is bound by the host CPU, whose speed drifts on a
shared machine: runs are paired (same prompt, the order alternating) and the
overhead is the median of the pairs' ratios, not a ratio of two medians.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from hcache_adapter.compat import cache_kwarg, new_cache
from hcache_adapter.hcache import HCache
from hcache_adapter.timing import FirstTokenTimer

STORED_METHODS = ("kv", "hcache", "auto")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keys_with_prefix(store, prefix: str) -> list[bytes]:
    p = prefix.encode()
    return [k for k in store.keys() if k.startswith(p)]


def measure_tbt(model, hc: HCache, n: int, new_tokens: int, reps: int, device) -> dict:
    """Median time between tokens while decoding, without and with HCache saving every chunk.

    Decoding with transformers is bound by the host CPU, whose speed drifts on a
    shared machine: runs are paired (same prompt, the order alternating) and the
    overhead is the median of the pairs' ratios, not a ratio of two medians.
    """
    vocab = model.config.vocab_size
    results: dict[str, list[float]] = {"plain": [], "saving": []}
    ratios = []
    for rep in range(reps + 1):
        ids = torch.randint(10, vocab, (1, n), device=device)
        pair = {}
        for mode in (("plain", "saving") if rep % 2 else ("saving", "plain")):
            stamps = _TokenStamps()
            gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=stamps)
            if mode == "plain":
                model.generate(ids, **gen)
            else:
                hc.generate(ids, **gen)
            pair[mode] = stamps.median_gap_ms()
        for k in keys_with_prefix(hc.store, hc.namespace + "/"):
            hc.store.delete(k)
        if rep:  # the first pair warms up
            for mode, t in pair.items():
                results[mode].append(t)
            ratios.append(pair["saving"] / pair["plain"])
    plain, saving = statistics.median(results["plain"]), statistics.median(results["saving"])
    return {"context_tokens": n, "new_tokens": new_tokens, "tbt_ms_plain": plain, "tbt_ms_saving": saving,
            "overhead_pct": 100 * (statistics.median(ratios) - 1), "pairs": len(ratios)}


class _TokenStamps(FirstTokenTimer):
    def __init__(self):
        super().__init__()
        self.stamps: list[float] = []

    def put(self, value):
        super().put(value)
        self.stamps.append(time.perf_counter())

    def median_gap_ms(self) -> float:
        gaps = [(b - a) * 1e3 for a, b in zip(self.stamps[2:], self.stamps[3:])]
        return statistics.median(gaps)


def chat_trace(model, store, methods, rounds: int, system_tokens: int, new_tokens: int, device, seed: int = 0) -> list[dict]:
    """TTFT per round of one multi-round chat, per method; each round's output is checked against
    `model.generate` on the same tokens over the model's own prefill of the restored prefix (greedy,
    a fixed number of new tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    system = rng.integers(10, vocab, system_tokens).tolist()
    users = [rng.integers(10, vocab, int(np.clip(rng.lognormal(np.log(60), 0.8), 16, 400))).tolist() for _ in range(rounds)]
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    rows = []
    for method in ("recompute",) + tuple(m for m in methods if m in STORED_METHODS):
        hc = HCache(model, store, method=method, namespace=f"chat-{method}")
        history = list(system)
        for r in range(rounds):
            ids = torch.tensor([history + users[r]], device=device)
            timer = FirstTokenTimer()
            _sync(device)
            out = hc.generate(ids, streamer=timer, **gen)
            generated = out[0, ids.shape[1]:].tolist()
            # The same computation without HCache: the model's own prefill of the prefix that was
            # restored, then generate on top (in fp16 a different split of the prompt alone can flip
            # a near-tie of a random model's logits, which would say nothing about the restore).
            n = hc.last_restore.tokens if method != "recompute" else 0
            own = None
            if n:
                own = new_cache(model)
                with torch.no_grad():
                    model(ids[:, :n], use_cache=True, **{cache_kwarg(model): own})
            reference = model.generate(ids, **({cache_kwarg(model): own} if own is not None else {}), **gen)
            reference = reference[0, ids.shape[1]:].tolist()
            first_diff = next((i for i, (a, b) in enumerate(zip(generated, reference)) if a != b), None)
            rows.append({"method": method, "round": r, "context_tokens": ids.shape[1],
                         "restored_tokens": hc.last_restore.tokens if method != "recompute" else 0,
                         "restore_ms": hc.last_restore.seconds * 1e3 if method != "recompute" else 0.0,
                         "ttft_ms": timer.ttft_s * 1e3, "identical": generated == reference, "first_diff": first_diff})
            history = history + users[r] + generated
        for k in keys_with_prefix(store, f"chat-{method}/"):
            store.delete(k)
    return rows


def hardware(device, root: Path) -> str:
    parts = [f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"]
    try:
        with open("/proc/meminfo") as f:
            parts.append(f"{int(f.readline().split()[1]) / 2**20:.0f} GiB RAM")
    except OSError:
        pass
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    parts.append(f"torch {torch.__version__}")
    import transformers

    parts.append(f"transformers {transformers.__version__}")
    return ", ".join(parts)



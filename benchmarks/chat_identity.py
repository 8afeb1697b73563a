"""Are greedy tokens on a GPU a fair identity check? Where `generate` variants first differ, and by how much.

    python benchmarks/chat_identity.py [--model llama2-7b] [--context 1192] [--tokens 32]

Random-weight models have nearly flat next-token distributions, so greedy
decoding flips on rounding noise. This runs `model.generate` twice (is it even
deterministic?), with an explicit empty cache, and through HCache (kv, hcache)
with nothing stored and with the prefix restored, and prints the first position
where each differs from the first run and the reference's top-1/top-2 logit gap
there.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from hcache_adapter import HCache
from hcache_adapter.bench import build_model
from hcache_adapter.compat import new_cache
from hstore import StoreConfig, TieredStore


def first_diff(a: torch.Tensor, b: torch.Tensor) -> int | None:
    n = min(a.shape[1], b.shape[1])
    d = (a[0, :n] != b[0, :n]).nonzero()
    return int(d[0]) if len(d) else None


@torch.no_grad()
def gap_at(model, seq: torch.Tensor, pos: int) -> float:
    """top-1 minus top-2 logit of the reference's prediction for position `pos`."""
    logits = model(seq[:, :pos]).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--context", type=int, default=1192)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    dev = torch.device("cuda")
    model = build_model(args.model, torch.float16, dev, None, args.context + args.tokens + 64)
    ids = torch.randint(10, model.config.vocab_size, (1, args.context), device=dev)
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    ref = model.generate(ids, **gen)
    runs = {"model.generate again": lambda: model.generate(ids, **gen),
            "model.generate, explicit empty cache": lambda: model.generate(ids, past_key_values=new_cache(model), **gen)}
    with tempfile.TemporaryDirectory(dir="/tmp") as root, \
            TieredStore(StoreConfig(root=root, dram_bytes=8 << 30, nvme_bytes=0)) as store:
        for method in ("kv", "hcache"):
            hc = HCache(model, store, method=method, namespace=method)
            runs[f"{method}: nothing stored (saves)"] = lambda hc=hc: hc.generate(ids, **gen)
            runs[f"{method}: prefix restored"] = lambda hc=hc: hc.generate(ids, **gen)
        for name, run in runs.items():
            out = run()
            d = first_diff(ref, out)
            where = "identical" if d is None else f"first differs at token {d - ids.shape[1]} (ref gap {gap_at(model, ref, d):.4f})"
            print(f"{name:>40}: {where}")


if __name__ == "__main__":
    main()

"""fp16 on a GPU: how far restored K/V are from the model's own prefill, per architecture and method.

    python benchmarks/fp16_errors.py [--out fp16_errors.md]

For every architecture of the test suite (tiny random models, tests/test_projection.py's
CASES) in float16 on CUDA: save a 40-token prompt with HCache (method hcache, kv, auto),
restore it from DRAM and from NVMe, and report the max abs error of every layer's K and V
against a prefill of the same tokens, plus whether greedy `generate()` gives the same tokens.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_projection import CASES, _build  # noqa: E402

from hcache_adapter import HCache  # noqa: E402
from hcache_adapter.compat import cache_kwarg, new_cache  # noqa: E402
from hstore import StoreConfig, TieredStore  # noqa: E402

C, SAVED, TOTAL = 8, 40, 48


@torch.no_grad()
def max_error(model, cache, ids, n) -> float:
    ref = new_cache(model)
    model(ids[:, :n], use_cache=True, **{cache_kwarg(model): ref})
    return max(max((a.keys.float() - b.keys.float()).abs().max().item(),
                   (a.values.float() - b.values.float()).abs().max().item())
               for a, b in zip(cache.layers, ref.layers))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--device", default="cuda", help="cpu only to try the script (with --dtype float32)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    lines = [f"| architecture | method | source | restored tokens | max abs err ({args.dtype}) | generate identical |", "|---|---|---|---|---|---|"]
    worst = 0.0
    for name in sorted(CASES):
        model = _build(name, dtype).to(dev)
        model.generation_config.pad_token_id = 0
        ids = torch.randint(3, model.config.vocab_size, (1, TOTAL), device=dev,
                            generator=torch.Generator(dev).manual_seed(0))
        for method in ("hcache", "kv", "auto"):
            with tempfile.TemporaryDirectory() as root, \
                    TieredStore(StoreConfig(root=root, dram_bytes=16 << 20, nvme_bytes=64 << 20)) as store:
                hc = HCache(model, store, method=method, chunk_tokens=C, plan="HK" * (model.config.num_hidden_layers // 2)
                            if method == "auto" else None)
                hc.save(ids[:, :SAVED])
                store.flush()
                for source in ("dram", "nvme"):
                    if source == "nvme":
                        store.drop_cached()
                    cache, n = hc.restore(ids)
                    err = max_error(model, cache, ids, n) if n else float("nan")
                    gen = dict(max_new_tokens=8, do_sample=False)
                    same = torch.equal(hc.generate(ids, **gen), model.generate(ids, **gen))
                    worst = max(worst, err)
                    lines.append(f"| {name} | {method} | {source} | {n} | {err:.3e} | {'yes' if same else 'NO'} |")
                    print(lines[-1], flush=True)
        del model
    lines.append(f"\nworst max abs error: {worst:.3e}")
    print(lines[-1])
    if args.out:
        args.out.write_text(
            f"# Restored K/V vs prefill, {args.dtype}, {torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""fp16 on a GPU: how far restored state is from the model's own prefill, per architecture.

    python benchmarks/fp16_errors.py [--out fp16_errors.md]                     # the fast-path cases x methods
    python benchmarks/fp16_errors.py --families all --json fp16_families.json   # every causal-LM family
    python benchmarks/fp16_errors.py --device cpu --dtype float32 [--families llama,gpt2]   # try it on a CPU

Default (`--families cases`): every architecture of tests/helpers/models.py's CASES (tiny random
models) in float16 on CUDA: save a 40-token prompt with HCache (method hcache, kv, auto), restore it
from DRAM and from NVMe, and report the max abs error of every layer's K and V against a prefill of
the same tokens, plus whether greedy `generate()` gives the same tokens.

`--families all` (or a comma list of model types): every family of the architecture sweep
(tests/helpers/models.py's `tiny_causal_lm`), served as `support()` says; for those served by
hidden-state or K/V restore, the max abs error of the state restored from DRAM against a prefill.
`--json` writes {family: error} for `python -m tests.helpers.sweep --fp16 FILE --write docs/architectures.md`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcache_adapter import HCache  # noqa: E402
from hcache_adapter.projection import support  # noqa: E402
from hstore import StoreConfig, TieredStore  # noqa: E402
from tests.helpers.models import CASES, NotBuildable, build, causal_lm_types, tiny_causal_lm  # noqa: E402
from tests.helpers.sweep import restore_error  # noqa: E402

C, SAVED, TOTAL = 8, 40, 48


def _store(root: str) -> TieredStore:
    return TieredStore(StoreConfig(root=root, dram_bytes=16 << 20, nvme_bytes=64 << 20))


def _ids(model, dev) -> torch.Tensor:
    vocab = model.config.get_text_config(decoder=True).vocab_size
    return torch.randint(3, vocab, (1, TOTAL), generator=torch.Generator().manual_seed(0)).to(dev)


def cases_table(dev: torch.device, dtype: torch.dtype, dtype_name: str) -> tuple[list[str], float]:
    lines = [f"| architecture | method | source | restored tokens | max abs err ({dtype_name}) | generate identical |",
             "|---|---|---|---|---|---|"]
    worst = 0.0
    for name in sorted(CASES):
        model = build(name, dtype).to(dev)
        model.generation_config.pad_token_id = 0
        ids = _ids(model, dev)
        for method in ("hcache", "kv", "auto"):
            with tempfile.TemporaryDirectory() as root, _store(root) as store:
                plan = "HK" * (model.config.num_hidden_layers // 2) if method == "auto" else None
                hc = HCache(model, store, method=method, chunk_tokens=C, plan=plan)
                hc.save(ids[:, :SAVED])
                store.flush()
                for source in ("dram", "nvme"):
                    if source == "nvme":
                        store.drop_cached()
                    cache, n = hc.restore(ids)
                    err = restore_error(model, cache, ids, n) if n else float("nan")
                    gen = dict(max_new_tokens=8, do_sample=False)
                    same = torch.equal(hc.generate(ids, **gen), model.generate(ids, **gen))
                    worst = max(worst, err)
                    lines.append(f"| {name} | {method} | {source} | {n} | {err:.3e} | {'yes' if same else 'NO'} |")
                    print(lines[-1], flush=True)
        del model
    return lines, worst


def family_error(family: str, dev: torch.device, dtype: torch.dtype) -> tuple[str, float | str]:
    """(served by, max abs error of the state restored from DRAM) for one family; the error is a note if none."""
    try:
        model = tiny_causal_lm(family, dtype=dtype).to(dev)
    except NotBuildable as e:
        return "not buildable", str(e)
    s = support(model)
    if s.kind not in ("hidden", "kv"):
        return s.kind, s.reason
    ids = _ids(model, dev)
    with tempfile.TemporaryDirectory() as root, _store(root) as store:
        hc = HCache(model, store, method="hcache" if s.kind == "hidden" else "kv", chunk_tokens=C)
        hc.save(ids[:, :SAVED])
        cache, n = hc.restore(ids)
        return s.kind, restore_error(model, cache, ids, n) if n else "nothing restored"


def families_table(families: list[str], dev: torch.device, dtype: torch.dtype, dtype_name: str):
    lines = [f"| family | served by | max abs err ({dtype_name}) |", "|---|---|---|"]
    errors: dict[str, float | str] = {}
    for family in families:
        try:
            kind, err = family_error(family, dev, dtype)
        except Exception as e:  # report and go on: one family must not stop the table
            kind, err = "error", f"{type(e).__name__}: {str(e)[:120]}"
        errors[family] = err
        shown = f"{err:.3e}" if isinstance(err, float) else err
        lines.append(f"| {family} | {kind} | {shown} |")
        print(lines[-1], flush=True)
    numbers = [e for e in errors.values() if isinstance(e, float)]
    return lines, max(numbers, default=0.0), errors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    p.add_argument("--json", type=Path, default=None, help="--families: write {family: error} here")
    p.add_argument("--families", default="cases", help="'cases', 'all', or a comma list of model types")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--device", default="cuda", help="cpu only to try the script (with --dtype float32)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    if args.families == "cases":
        lines, worst = cases_table(dev, dtype, args.dtype)
    else:
        families = causal_lm_types() if args.families == "all" else args.families.split(",")
        lines, worst, errors = families_table(families, dev, dtype, args.dtype)
        if args.json:
            args.json.write_text(json.dumps({f: e for f, e in errors.items() if isinstance(e, float)}, indent=1))
    lines.append(f"\nworst max abs error: {worst:.3e}")
    print(lines[-1])
    if args.out:
        where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
        args.out.write_text(f"# Restored state vs prefill, {args.dtype}, {where}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`hcache profile`: measure and print the profile `auto` would plan with, for a model shape."""
from __future__ import annotations

import torch


def main(argv: list[str] | None = None) -> int:
    """`hcache profile`: measure and print the profile `auto` would plan with."""
    import argparse
    import tempfile

    from hcache_adapter.bench.models import SHAPES, build_model
    from hcache_adapter.hcache import HCache
    from hstore import StoreConfig, TieredStore

    p = argparse.ArgumentParser(prog="hcache profile", description=main.__doc__.split(":", 1)[1].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32",
                   choices=("float16", "bfloat16", "float32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--root", default=None, help="store root (a temporary directory when omitted)")
    p.add_argument("--nvme-gib", type=float, default=1.0, help="0: profile without an NVMe tier")
    args = p.parse_args(argv)
    model = build_model(args.model, dtype=getattr(torch, args.dtype), device=args.device, layers=args.layers)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        cfg = StoreConfig(root=args.root or tmp, dram_bytes=1 << 30, nvme_bytes=int(args.nvme_gib * 2**30))
        with TieredStore(cfg) as store:
            print(HCache(model, store, method="auto").profile.to_json())
    return 0

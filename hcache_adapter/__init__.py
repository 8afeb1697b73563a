"""hcache_adapter: HCache save / project / restore inside HuggingFace `generate()`.

    from hstore import TieredStore, StoreConfig
    from hcache_adapter import HCache
    hc = HCache(model, store, method="hcache")   # "hcache" | "kv" | "recompute" | "auto"
    out = hc.generate(input_ids, max_new_tokens=32)
"""
from hcache_adapter.hcache import METHODS, HCache, RestoreInfo
from hcache_adapter.scheduler.profile import Profile

__all__ = ["HCache", "METHODS", "RestoreInfo", "Profile"]

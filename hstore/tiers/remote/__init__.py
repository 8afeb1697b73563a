"""The remote tier: state shared across processes and serving nodes through Redis (one server or a Cluster).

    tier = RedisTier("redis://127.0.0.1:6379/0")          # or rediss://, redis+cluster://host:port
    tier.write_many([WriteItem(key, payload, dtype, shape)]) -> [True]
    tier.read_many([key]) -> [RemoteRecord(dtype, shape, payload)]   # or None: a miss

config.py parses and validates the URL, codec.py is the record format, wire.py sends payloads
without copying them, shards.py routes keys to servers, health.py backs off from failed ones,
stats.py counts, tier.py puts them together, namespace.py scans and clears a namespace.
"""
from hstore.tiers.remote.config import RemoteConfig
from hstore.tiers.remote.tier import RedisTier

__all__ = ["RedisTier", "RemoteConfig"]

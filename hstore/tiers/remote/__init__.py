"""The remote tier: state shared across processes and serving nodes through Redis (one server or a Cluster).

    tier = connect("redis://127.0.0.1:6379/0")             # or rediss://, redis+cluster://host:port
    tier.write_many([WriteItem(key, payload, dtype, shape)]) -> [True]
    tier.read_many([key]) -> [RemoteRecord(dtype, shape, payload)]   # or None: a miss

config.py parses and validates the URL, codec.py is the record format, wire.py sends payloads
without copying them, shards.py routes keys to servers, health.py backs off from failed ones,
stats.py counts, tier.py puts them together, namespace.py scans and clears a namespace.
Only tier.py and below need the `redis` package; this module and config.py import without it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hstore.errors import StoreConfigError
from hstore.tiers.remote.config import RemoteConfig

if TYPE_CHECKING:
    from hstore.tiers.remote.tier import RedisTier

__all__ = ["RedisTier", "RemoteConfig", "connect"]


def connect(spec: "str | RemoteConfig") -> "RedisTier":
    """The Redis tier that `StoreConfig(remote=spec)` names (a URL or a RemoteConfig).

    Raises StoreConfigError, with the URL redacted, for a bad URL, a missing redis package, wrong
    credentials or a server that contradicts the URL; an unreachable server is not an error.
    """
    cfg = spec if isinstance(spec, RemoteConfig) else RemoteConfig(spec)
    try:
        from hstore.tiers.remote.tier import RedisTier
    except ImportError as e:
        raise StoreConfigError(f"remote {cfg.url}: the Redis tier needs redis-py "
                               f"(pip install 'hstore-hcache[remote]'): {e}") from None
    try:
        return RedisTier(cfg)
    except StoreConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever redis-py raised, say it with the URL redacted
        raise StoreConfigError(f"remote {cfg.url}: cannot open the tier ({type(e).__name__}: {e})") from None


def __getattr__(name: str):
    if name == "RedisTier":  # imported on first use: it needs redis-py
        from hstore.tiers.remote.tier import RedisTier

        return RedisTier
    raise AttributeError(name)

"""Eviction, admission and placement policies, and the factories the store's config uses.

Policies know nothing of tiers (foyer's split): any eviction policy can order
any tier, any admission policy can guard any tier. Each is a small class in
its own module; adding one is a class plus a line in a registry below.

Policies are not thread-safe; the store calls them under its lock.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from hstore.errors import StoreConfigError
from hstore.policy.admission import (
    AdmitAll,
    ProbabilisticAdmission,
    SecondHitAdmission,
    SizeLimitAdmission,
)
from hstore.policy.base import AdmissionPolicy, EvictionPolicy, PlacementPolicy
from hstore.policy.cost_aware import CostAwarePolicy
from hstore.policy.lru import LruPolicy
from hstore.policy.placement import MostFreePlacement, RoundRobinPlacement
from hstore.policy.s3fifo import S3FifoPolicy

__all__ = [
    "EvictionPolicy",
    "AdmissionPolicy",
    "PlacementPolicy",
    "LruPolicy",
    "S3FifoPolicy",
    "CostAwarePolicy",
    "AdmitAll",
    "SizeLimitAdmission",
    "SecondHitAdmission",
    "ProbabilisticAdmission",
    "RoundRobinPlacement",
    "MostFreePlacement",
    "EVICTION_POLICIES",
    "ADMISSION_POLICIES",
    "PLACEMENT_POLICIES",
    "make_eviction_policy",
    "make_admission_policy",
    "make_placement_policy",
]

# Config names -> classes. Names are matched case-insensitively, with "_" read as "-".
EVICTION_POLICIES: Mapping[str, Callable[..., EvictionPolicy]] = {
    "lru": LruPolicy,
    "s3fifo": S3FifoPolicy,
    "cost": CostAwarePolicy,
    "gdsf": CostAwarePolicy,
}
ADMISSION_POLICIES: Mapping[str, Callable[..., AdmissionPolicy]] = {
    "all": AdmitAll,
    "second-hit": SecondHitAdmission,
    "size-limit": SizeLimitAdmission,
    "probabilistic": ProbabilisticAdmission,
}
PLACEMENT_POLICIES: Mapping[str, Callable[..., PlacementPolicy]] = {
    "round-robin": RoundRobinPlacement,
    "most-free": MostFreePlacement,
}

_P = TypeVar("_P")


def _make(kind: str, registry: Mapping[str, Callable[..., _P]], base: type,
          spec: Any, kwargs: dict[str, Any]) -> _P:
    """Build a fresh policy named `spec`, or return `spec` if it already is one.

    Every call builds a new object: policies hold per-tier state and must not
    be shared between tiers by accident.
    """
    if isinstance(spec, base):
        if kwargs:
            raise StoreConfigError(f"{kind} policy options {sorted(kwargs)} given with a built policy object")
        return spec  # type: ignore[return-value]
    valid = ", ".join(repr(n) for n in registry)
    if not isinstance(spec, str):
        raise StoreConfigError(f"{kind} policy must be a name ({valid}) or a {base.__name__}, got {spec!r}")
    factory = registry.get(spec.strip().lower().replace("_", "-"))
    if factory is None:
        raise StoreConfigError(f"unknown {kind} policy {spec!r}; valid names: {valid}")
    try:
        return factory(**kwargs)
    except TypeError as exc:  # missing or unknown option
        raise StoreConfigError(f"bad options for {kind} policy {spec!r}: {exc}") from exc


def make_eviction_policy(name: str | EvictionPolicy, **options: Any) -> EvictionPolicy:
    """A new eviction policy: "lru", "s3fifo", "cost" (alias "gdsf"); `options` go to its constructor."""
    return _make("eviction", EVICTION_POLICIES, EvictionPolicy, name, options)


def make_admission_policy(name: str | AdmissionPolicy, **options: Any) -> AdmissionPolicy:
    """A new admission policy: "all", "second-hit", "size-limit" (needs max_bytes), "probabilistic" (needs p)."""
    return _make("admission", ADMISSION_POLICIES, AdmissionPolicy, name, options)


def make_placement_policy(name: str | PlacementPolicy, **options: Any) -> PlacementPolicy:
    """A new placement policy: "round-robin", "most-free"."""
    return _make("placement", PLACEMENT_POLICIES, PlacementPolicy, name, options)

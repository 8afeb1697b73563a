"""Policy interfaces: eviction, admission and placement.

Policies see keys, sizes and optional cost hints, never tiers or devices, so any
policy can drive any tier (foyer's split). The store owns one eviction policy
per tier and asks it for victims when the tier is full.

Policies are not thread-safe: the store calls them under its own lock, and a
policy shared by two stores (or driven from two threads) needs one too.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterable, Sequence


def check_size(size: int) -> int:
    """Return `size` if it is a usable item size, else raise ValueError.

    Size-aware policies keep byte counters; one negative size would corrupt
    them for good, so it is refused at the door rather than clamped.
    """
    if size < 0:
        raise ValueError(f"item size must be >= 0, got {size}")
    return size


class EvictionPolicy(ABC):
    """Orders the keys resident in one tier for eviction.

    A policy tracks a set of keys: `insert` adds, `remove` and a returned
    `pop_victim` take away, `access` only reorders. It never evicts on its own
    (it does not know the tier's capacity); the store asks for victims.
    """

    name: str = "abstract"

    @abstractmethod
    def insert(self, key: bytes, size: int, cost: float | None = None) -> None:
        """`key` entered the tier. `cost` is an optional restore-cost hint (bigger = dearer to lose).

        Inserting a key already present updates its size/cost and counts as an access.
        """

    def check_cost(self, cost: float | None) -> None:
        """Raise ValueError if this policy cannot take `cost` as a hint.

        The store asks before it installs anything, so a put with a bad hint changes
        nothing. Policies that ignore costs accept any number.
        """

    @abstractmethod
    def access(self, key: bytes) -> None:
        """`key` was hit. Unknown keys are ignored."""

    def access_many(self, keys: Iterable[bytes]) -> None:
        """`access` for a batch of hits, in order (a read of many keys calls this once)."""
        for key in keys:
            self.access(key)

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """`key` left the tier for another reason (deleted, overwritten). Unknown keys are ignored."""

    @abstractmethod
    def pop_victim(self, skip: Callable[[bytes], bool] | None = None) -> bytes | None:
        """Choose the next key to evict, forget it, and return it.

        Keys for which `skip(key)` is true (e.g. pinned by a reader) are passed
        over and stay tracked; the policy may reorder them but never loses or
        returns them. Returns None when every tracked key is skipped or
        nothing is tracked, and only then.
        """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...


class AdmissionPolicy(ABC):
    """Decides whether an item is worth writing to a (slower, wearing) tier."""

    name: str = "abstract"

    @abstractmethod
    def admit(self, key: bytes, size: int, cost: float | None = None) -> bool: ...


class PlacementPolicy(ABC):
    """Chooses which of several devices of one tier receives a new item (striping)."""

    name: str = "abstract"

    @abstractmethod
    def choose(self, key: bytes, size: int, free_bytes: Sequence[int]) -> int | None:
        """Index of the device to use, or None if no device has `size` bytes free."""

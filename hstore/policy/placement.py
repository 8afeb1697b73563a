"""Placement policies: which of a tier's devices receives a new item.

Why: a tier striped over several SSDs is only as fast as the devices it keeps
busy. HCache stripes its state chunks over SSDs round-robin so consecutive
chunks of one request are read in parallel; `MostFreePlacement` instead
evens out fill when item sizes vary widely. Placement sees free bytes per
device, never the devices. Not thread-safe (the store locks).
"""
from __future__ import annotations

from typing import Sequence

from hstore.layout.striping import next_round_robin
from hstore.policy.base import PlacementPolicy


class RoundRobinPlacement(PlacementPolicy):
    """Device i, then i+1, ... wrapping around, passing over devices without room.

    The cursor moves past the device chosen, not merely by one, so a full
    device does not make its successor take two items in a row.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, key: bytes, size: int, free_bytes: Sequence[int]) -> int | None:
        device = next_round_robin(self._next, free_bytes, size)
        if device is not None:
            self._next = (device + 1) % len(free_bytes)
        return device


class MostFreePlacement(PlacementPolicy):
    """The device with the most free bytes (lowest index on ties)."""

    name = "most-free"

    def choose(self, key: bytes, size: int, free_bytes: Sequence[int]) -> int | None:
        best: int | None = None
        for device, free in enumerate(free_bytes):
            if free >= size and (best is None or free > free_bytes[best]):
                best = device
        return best

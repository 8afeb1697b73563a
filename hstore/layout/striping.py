"""Striping items over several devices.

HCache spreads the chunks of one request round-robin over multiple SSDs so a
restore reads from all of them at once and their bandwidth adds up. These are
the pure functions of that rule; `RoundRobinPlacement` (the NVMe tier's default
placement) is `next_round_robin` plus a cursor, so the properties tested here
are the ones production runs.
"""
from __future__ import annotations

import operator
from typing import Sequence

__all__ = ["assign_round_robin", "next_round_robin"]


def assign_round_robin(n_items: int, n_devices: int, start: int = 0) -> list[int]:
    """Device index of each item: item `i` goes to ``(start + i) % n_devices``.

    Deterministic, and balanced: per-device counts differ by at most one.
    `start` rotates the pattern (e.g. by request) so that many short requests
    do not all begin on device 0. This is what `next_round_robin` yields while
    every device has room.
    """
    n_items, n_devices, start = operator.index(n_items), operator.index(n_devices), operator.index(start)
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if n_devices <= 0:
        raise ValueError(f"n_devices must be > 0, got {n_devices}")
    return [(start + i) % n_devices for i in range(n_items)]


def next_round_robin(cursor: int, free_bytes: Sequence[int], size: int) -> int | None:
    """The first device at or after `cursor` (wrapping around) with `size` bytes free, or None.

    Full devices are passed over; the caller moves its cursor to one past the device chosen
    (not merely by one), so a full device does not make its successor take two items in a row.
    """
    n = len(free_bytes)
    for step in range(n):
        device = (cursor + step) % n
        if free_bytes[device] >= size:
            return device
    return None

"""Striping items over several devices.

HCache spreads the chunks of one request round-robin over multiple SSDs so a
restore reads from all of them at once and their bandwidth adds up. The
assignment is a pure function of the item index, so a reader recomputes where
each chunk went without consulting any index.
"""
from __future__ import annotations

import operator

__all__ = ["assign_round_robin"]


def assign_round_robin(n_items: int, n_devices: int, start: int = 0) -> list[int]:
    """Device index of each item: item `i` goes to ``(start + i) % n_devices``.

    Deterministic, and balanced: per-device counts differ by at most one.
    `start` rotates the pattern (e.g. by request) so that many short requests
    do not all begin on device 0.
    """
    n_items, n_devices, start = operator.index(n_items), operator.index(n_devices), operator.index(start)
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if n_devices <= 0:
        raise ValueError(f"n_devices must be > 0, got {n_devices}")
    return [(start + i) % n_devices for i in range(n_items)]

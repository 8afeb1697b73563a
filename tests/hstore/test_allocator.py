"""ExtentAllocator against a reference model: a bytearray with one cell per unit.

The model knows which units are used, so it can compute exactly what a
best-fit, lowest-offset, coalescing allocator must answer: whether an
allocation fits (some maximal free run is long enough), where it lands (the
start of the shortest such run, lowest offset among equals), and every piece
of accounting.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hstore.buffers import align_up
from hstore.tiers.allocator import ExtentAllocator

FREE, USED = 0, 1


def free_runs(cells: bytearray) -> list[tuple[int, int]]:
    """Maximal runs of free cells as (start, length), by start."""
    runs, start = [], None
    for i, cell in enumerate(bytes(cells) + bytes([USED])):
        if cell == FREE and start is None:
            start = i
        elif cell != FREE and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(unit=st.sampled_from([1, 8, 4096]), units=st.integers(0, 48), tail=st.integers(0, 4095))
    def setup(self, unit, units, tail):
        self.unit = unit
        self.alloc = ExtentAllocator(units * unit + tail % unit, unit)  # capacity rounds down
        self.cells = bytearray(units)
        self.live: dict[int, int] = {}  # offset -> rounded size, what the allocator must hold

    # -- model helpers --

    def units_of(self, nbytes: int) -> int:
        return align_up(nbytes, self.unit) // self.unit

    def mark(self, offset: int, size: int, value: int) -> None:
        first, count = offset // self.unit, size // self.unit
        expected = USED if value == FREE else FREE
        assert all(c == expected for c in self.cells[first : first + count]), "overlap or double free"
        self.cells[first : first + count] = bytes([value]) * count

    def offsets(self, data):
        return data.draw(st.sampled_from(sorted(self.live)))

    # -- rules --

    @rule(nbytes=st.integers(1, 50 * 4096))
    def allocate(self, nbytes):
        need = self.units_of(nbytes)
        fitting = [(length, start) for start, length in free_runs(self.cells) if length >= need]
        offset = self.alloc.allocate(nbytes)
        if not fitting:
            assert offset is None
            return
        assert offset == min(fitting)[1] * self.unit  # best fit, lowest offset, front of the run
        size = need * self.unit
        assert self.alloc.size_of(offset) == size
        self.mark(offset, size, USED)
        self.live[offset] = size

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        offset = self.offsets(data)
        self.alloc.free(offset)
        self.mark(offset, self.live.pop(offset), FREE)
        with pytest.raises(KeyError):
            self.alloc.free(offset)  # double free

    @rule(offset=st.integers(0, 50 * 4096))
    def free_unknown(self, offset):
        if offset not in self.live:
            with pytest.raises(KeyError):
                self.alloc.free(offset)

    @precondition(lambda self: self.live)
    @rule()
    def free_everything(self):
        for offset, _ in self.alloc.extents():  # a snapshot: freeing while iterating is allowed
            self.alloc.free(offset)
            self.mark(offset, self.live.pop(offset), FREE)
        assert self.alloc.largest_free == self.alloc.capacity and self.alloc.used == 0

    @rule(first=st.integers(0, 52), count=st.integers(1, 8), misalign=st.integers(0, 3), shave=st.integers(0, 3))
    def reserve(self, first, count, misalign, shave):
        self.try_reserve(first * self.unit + misalign * (self.unit > 1), count, shave)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(1, 4), shift=st.integers(-1, 1), after=st.booleans())
    def reserve_at_edge(self, data, count, shift, after):
        """Ranges that just touch (shift 0) or overlap by one unit (shift +-1) a used extent."""
        offset = self.offsets(data)
        if after:
            start = offset + self.live[offset] + shift * self.unit
        else:
            start = offset - count * self.unit + shift * self.unit
        self.try_reserve(start, count, 0)

    def try_reserve(self, offset: int, count: int, shave: int) -> None:
        """Reserve `count` units at `offset` (nbytes a bit short of them); the model decides validity."""
        nbytes = count * self.unit - shave % self.unit  # rounds up to `count` units
        first = offset // self.unit
        valid = (
            offset >= 0
            and offset % self.unit == 0
            and first + count <= len(self.cells)
            and all(c == FREE for c in self.cells[first : first + count])
        )
        if not valid:
            with pytest.raises(ValueError):
                self.alloc.reserve(offset, nbytes)
            return
        self.alloc.reserve(offset, nbytes)
        size = count * self.unit
        self.mark(offset, size, USED)
        self.live[offset] = size

    # -- invariants --

    @invariant()
    def accounting_is_exact(self):
        used_units = sum(self.cells)
        assert self.alloc.capacity == len(self.cells) * self.unit
        assert self.alloc.used == used_units * self.unit
        assert self.alloc.free_bytes == (len(self.cells) - used_units) * self.unit
        assert len(self.alloc) == len(self.live)
        assert list(self.alloc.extents()) == sorted(self.live.items())

    @invariant()
    def free_map_is_coalesced(self):
        runs = free_runs(self.cells)
        assert self.alloc.largest_free == max((n for _, n in runs), default=0) * self.unit
        # the free map holds exactly the maximal free runs (nothing left unmerged)
        assert self.alloc.free_extents() == [(s * self.unit, n * self.unit) for s, n in runs]


AllocatorMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestAllocatorModel = AllocatorMachine.TestCase


# -- unit tests ------------------------------------------------------------------


def test_consecutive_allocations_are_adjacent():
    alloc = ExtentAllocator(64 << 20)
    sizes = [65536, 1, 4096, 4097, 8 << 20, 12345]
    offsets = [alloc.allocate(n) for n in sizes]
    assert offsets[0] == 0
    for i in range(len(sizes) - 1):
        assert offsets[i + 1] == offsets[i] + align_up(sizes[i], 4096)
    assert [alloc.size_of(o) for o in offsets] == [align_up(n, 4096) for n in sizes]


def test_capacity_rounds_down_and_full_arena_is_one_extent():
    alloc = ExtentAllocator(3 * 4096 + 100)
    assert alloc.capacity == 3 * 4096 == alloc.largest_free == alloc.free_bytes
    assert alloc.allocate(3 * 4096 + 1) is None
    assert alloc.allocate(3 * 4096) == 0
    assert alloc.allocate(1) is None and alloc.largest_free == 0
    empty = ExtentAllocator(100)
    assert empty.capacity == 0 and empty.allocate(1) is None


def test_best_fit_prefers_smallest_then_lowest_hole():
    alloc = ExtentAllocator(32 * 4096)
    offs = [alloc.allocate(4096 * n) for n in (3, 1, 2, 1, 2, 1)]  # holes after freeing: 3, 2, 2
    for i in (0, 2, 4):
        alloc.free(offs[i])
    assert alloc.allocate(2 * 4096) == offs[2]  # exact fit, lowest of the two
    assert alloc.allocate(1) == offs[4]  # smallest remaining hole that fits (2 units)
    assert alloc.allocate(3 * 4096) == offs[0]


def test_error_cases():
    alloc = ExtentAllocator(16 * 4096)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            alloc.allocate(bad)
    with pytest.raises(TypeError):
        alloc.allocate(1.5)
    with pytest.raises(KeyError):
        alloc.free(0)
    with pytest.raises(KeyError):
        alloc.size_of(0)
    off = alloc.allocate(2 * 4096)
    with pytest.raises(KeyError):
        alloc.free(off + 4096)  # inside an extent, not its start
    alloc.free(off)
    with pytest.raises(KeyError):
        alloc.free(off)  # double free
    alloc.reserve(4 * 4096, 4096)
    for offset, nbytes in [
        (4 * 4096, 1),  # same range again
        (3 * 4096, 2 * 4096),  # overlaps it from below
        (100, 4096),  # not unit aligned
        (15 * 4096, 4097),  # leaves capacity
        (-4096, 4096),
        (0, 0),
    ]:
        with pytest.raises(ValueError):
            alloc.reserve(offset, nbytes)
    for bad in [(-1, 4096), (4096, 0)]:
        with pytest.raises(ValueError):
            ExtentAllocator(*bad)


def test_reserve_rebuilds_a_persisted_map():
    original = ExtentAllocator(1 << 20)
    offs = [original.allocate(n) for n in (5000, 70000, 4096, 123456)]
    original.free(offs[1])
    reopened = ExtentAllocator(1 << 20)
    for offset, size in reversed(list(original.extents())):  # any order
        reopened.reserve(offset, size)
    assert list(reopened.extents()) == list(original.extents())
    assert reopened.largest_free == original.largest_free and reopened.used == original.used
    assert reopened.allocate(70000) == original.allocate(70000) == offs[1]


def test_many_fragments_in_random_order():
    """1e5 live fragments freed in random order: stays exact and coalesces to one extent."""
    n = 100_000
    alloc = ExtentAllocator(n * 4096)
    offsets = [alloc.allocate(4096) for _ in range(n)]
    assert offsets == [i * 4096 for i in range(n)]
    random.Random(0).shuffle(offsets)
    for off in offsets[: n // 2]:
        alloc.free(off)
    assert alloc.free_bytes == n // 2 * 4096
    for off in offsets[n // 2 :]:
        alloc.free(off)
    assert alloc.largest_free == alloc.capacity and len(alloc.free_extents()) == 1

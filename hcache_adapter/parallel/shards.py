"""Which rank saves, reads and holds what under tensor parallelism: pure functions, property-tested.

Every rank sees the same input hidden state at every layer, so hidden-state
chunks are saved once: chunk c (its index in the prefix) by rank c % N, the
rank that also reads it back when the degree is unchanged, so a rank's share
of a restore is in its own store. K/V differ per rank (each holds its own
heads): every rank saves its own shard of every chunk, under a key that names
the degree and the rank (`Shard.key_suffix`). Hidden-state keys name neither,
so a prefix saved at one degree restores at any other.

At restore the ranks pool what they hold (which chunks each rank's stores
have, per layer) and `assign_reads` gives every chunk to one rank that holds
it, the saving rank first; each rank reads its share, and an all-gather of the
equal-sized shares (padded to the largest) gives every rank the whole layer,
put back in order by `gathered_order`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Shard:
    """One rank of a tensor-parallel group of `world` ranks."""

    world: int
    rank: int

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"a shard needs 0 <= rank < world, got rank {self.rank!r} of {self.world!r}")

    @property
    def key_suffix(self) -> str:
        """What a K/V key of this shard ends with (nothing for one process: single-GPU keys are unchanged)."""
        return "" if self.world == 1 else f".tp{self.world}r{self.rank}"

    def owns_chunk(self, chunk: int) -> bool:
        """Whether this rank saves hidden-state chunk `chunk` (its index in the prefix)."""
        return chunk_owner(chunk, self.world) == self.rank


def chunk_owner(chunk: int, world: int) -> int:
    """The rank that saves hidden-state chunk `chunk`: round robin, so a growing prefix stays balanced."""
    if chunk < 0:
        raise ValueError("chunk indices start at 0")
    return chunk % world


@dataclass(frozen=True)
class Assignment:
    """Who reads each chunk of one layer: `reader[c]` (-1: no rank holds it), at row `slot[c]` of its share."""

    reader: tuple[int, ...]
    slot: tuple[int, ...]
    world: int

    @property
    def share_rows(self) -> int:
        """Rows of every rank's contribution to the all-gather (the largest share; at least 1)."""
        return max([self.count(r) for r in range(self.world)] + [1])

    def count(self, rank: int) -> int:
        return sum(1 for r in self.reader if r == rank)

    def chunks_of(self, rank: int) -> list[int]:
        """The chunks `rank` reads, in the order of its share's rows."""
        return [c for c, r in enumerate(self.reader) if r == rank]

    def valid_chunks(self, share_valid: Sequence[int]) -> int:
        """Leading chunks of the layer usable after the gather, given how many leading rows of its share each
        rank read and verified: the first chunk no rank holds, or whose reader's row is past its valid rows,
        ends the prefix."""
        for c, (r, s) in enumerate(zip(self.reader, self.slot)):
            if r < 0 or s >= share_valid[r]:
                return c
        return len(self.reader)


def assign_reads(holds: Sequence[Sequence[bool]]) -> Assignment:
    """Give every chunk to one rank that holds it (`holds[rank][chunk]`): its saving rank (chunk % N) when that
    rank holds it, else the holder with the fewest chunks so far (lowest rank on ties). Every rank computes the
    same assignment from the same gathered table."""
    world = len(holds)
    if world == 0:
        raise ValueError("no ranks")
    m = len(holds[0])
    if any(len(h) != m for h in holds):
        raise ValueError("every rank must report the same chunks")
    reader = [-1] * m
    load = [0] * world
    for c in range(m):
        owner = chunk_owner(c, world)
        if holds[owner][c]:
            reader[c] = owner
            load[owner] += 1
    for c in range(m):
        if reader[c] < 0:
            holders = [r for r in range(world) if holds[r][c]]
            if holders:
                best = min(holders, key=lambda r: (load[r], r))
                reader[c] = best
                load[best] += 1
    slot = [-1] * m
    seen = [0] * world
    for c, r in enumerate(reader):
        if r >= 0:
            slot[c] = seen[r]
            seen[r] += 1
    return Assignment(tuple(reader), tuple(slot), world)


def gathered_order(assignment: Assignment, valid: int) -> list[int]:
    """Rows of the gathered tensor (`world` shares of `share_rows` rows, rank after rank) that hold chunks
    0..valid-1, in order: `gathered[order]` is the layer's first `valid` chunks."""
    k = assignment.share_rows
    return [assignment.reader[c] * k + assignment.slot[c] for c in range(valid)]


def kv_heads_of_rank(heads: int, world: int, rank: int) -> range:
    """The K/V heads rank `rank` holds when `heads` are split evenly over `world` ranks (colwise K/V weights)."""
    if heads % world:
        raise ValueError(f"{heads} K/V heads do not split evenly over {world} ranks")
    per = heads // world
    return range(rank * per, (rank + 1) * per)

"""How a rank reads chunks that another rank stored: the stores of one node, shared out among its ranks.

A `TieredStore` root is opened by one process (it holds an exclusive lock),
and its DRAM tier lives in that process. So a rank never reads a store that
another live rank has open: what one rank stored reaches the others through
the restore's all-gather (`gather.py`), which the restore needs anyway (every
rank needs the whole hidden state) and which runs over the device
interconnect instead of crossing PCIe twice. Each rank reads only chunks its
own stores hold; `shards.assign_reads` picks, per chunk, one rank that has it.

That leaves the chunks of ranks that are gone: a prefix saved at TP=4 and
restored at TP=2, or on one process. Two ways reach them:

* the remote tier (Redis, `StoreConfig(remote="redis://...")`):
  every rank's store is given the same server; whatever any rank flushed is
  found by every rank's store, on any node. This is the deployment story.
* on one node without it, `NodeStores`: the node keeps one store root per
  device slot (``root/slot0`` .. ``slotK``); a group of N ranks shares them
  out, rank r opening the roots of slots r, r+N, r+2N, ... and writing to
  its own slot. Every root is opened by exactly one process, and every root
  that holds state has a reader. What a closed store held in DRAM only is
  lost with it (as for any store); the flusher's NVMe copy is what carries
  over.

`NodeStores` is the store the rank's HCache is given: reads look in its
roots in order (its own first), writes go to its own root.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from hstore import StoreConfig, TieredStore


def slot_roots(root: str | os.PathLike, slots: int) -> list[Path]:
    """The per-slot store roots of a node directory."""
    return [Path(root) / f"slot{j}" for j in range(slots)]


def slots_of_rank(slots: int, world: int, rank: int) -> list[int]:
    """The slots rank `rank` of `world` opens: its own first, then every N-th after it."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a group of {world}")
    return list(range(rank, max(slots, world), world))


class NodeStores:
    """A store over several roots of one node: reads from any of them (own first), writes to the own root.

    Offers the part of `TieredStore`'s interface HCache uses (put_many, locate,
    get_many, get_many_into, delete, flush, drop_cached, stats, close; the own
    root's tiers and config).
    """

    def __init__(self, stores: Sequence[TieredStore]):
        if not stores:
            raise ValueError("NodeStores needs at least its own store")
        self.stores = list(stores)
        self.own = self.stores[0]

    @classmethod
    def open(cls, root: str | os.PathLike, *, slots: int, world: int, rank: int,
             config: Callable[[Path], StoreConfig] | None = None) -> "NodeStores":
        """Open rank `rank`'s share of the node's `slots` roots; `config(root)` gives each root's config."""
        make = config or (lambda path: StoreConfig(root=path))
        roots = slot_roots(root, max(slots, world))
        opened: list[TieredStore] = []
        try:
            for j in slots_of_rank(slots, world, rank):
                opened.append(TieredStore(make(roots[j])))
        except BaseException:
            for s in opened:
                s.close()
            raise
        return cls(opened)

    # -- the own root's tiers and config (profiles, save plans and probes use them) -------------
    @property
    def config(self) -> StoreConfig:
        return self.own.config

    @property
    def tiers(self):
        return self.own.tiers

    def tier(self, name: str):
        return self.own.tier(name)

    # -- writes: the own root ---------------------------------------------------------------
    def put_many(self, items, **kwargs) -> None:
        self.own.put_many(items, **kwargs)

    def put(self, key, tensor, **kwargs) -> None:
        self.own.put(key, tensor, **kwargs)

    def delete(self, key) -> bool:
        return self.own.delete(key)

    def flush(self):
        """Flush every root (state read from a peer root may be promoted into it); the own root's result."""
        for s in self.stores[1:]:
            s.flush()
        return self.own.flush()

    def drop_cached(self, keys=None) -> int:
        return sum(s.drop_cached(keys) for s in self.stores)

    # -- reads: the first root that holds a key ----------------------------------------------------
    def _holders(self, keys: Sequence) -> tuple[list[int], list[str | None]]:
        """Per key, the index of the store that holds it (-1: none) and its tier there."""
        which, tiers = [-1] * len(keys), [None] * len(keys)
        todo = list(range(len(keys)))
        for i, s in enumerate(self.stores):
            if not todo:
                break
            found = s.locate([keys[j] for j in todo])
            rest = []
            for j, tier in zip(todo, found):
                if tier is None:
                    rest.append(j)
                else:
                    which[j], tiers[j] = i, tier
            todo = rest
        return which, tiers

    def locate(self, keys) -> list[str | None]:
        keys = list(keys)
        if len(self.stores) == 1:
            return self.own.locate(keys)
        return self._holders(keys)[1]

    def __contains__(self, key) -> bool:
        return any(key in s for s in self.stores)

    def get(self, key, device="cpu"):
        return self.get_many([key], device=device)[0]

    def get_many(self, keys, device="cpu") -> list[torch.Tensor | None]:
        keys = list(keys)
        which, _ = self._holders(keys)
        out: list[torch.Tensor | None] = [None] * len(keys)
        for i, s in enumerate(self.stores):
            idx = [j for j, w in enumerate(which) if w == i]
            if idx:
                for j, t in zip(idx, s.get_many([keys[j] for j in idx], device=device)):
                    out[j] = t
        return out

    def get_many_into(self, keys, outs, **kwargs) -> list[bool]:
        keys = list(keys)
        if len(self.stores) == 1:
            return self.own.get_many_into(keys, outs, **kwargs)
        which, _ = self._holders(keys)
        found = [False] * len(keys)
        for i, s in enumerate(self.stores):
            idx = [j for j, w in enumerate(which) if w == i]
            if not idx:
                continue
            rows = outs if len(idx) == len(keys) else [outs[j] for j in idx]
            for j, ok in zip(idx, s.get_many_into([keys[j] for j in idx], rows, **kwargs)):
                found[j] = ok
        return found

    def stats(self) -> dict:
        return {"stores": [s.stats() for s in self.stores]}

    def close(self) -> None:
        for s in self.stores:
            s.close()

    def __enter__(self) -> "NodeStores":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

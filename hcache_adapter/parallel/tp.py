"""A model loaded with transformers' tensor parallelism: its group, this rank, and what the ranks agree on.

transformers (5.17 .. 5.24) loads `from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`
under `torch.distributed` by turning the sharded weights into DTensors on a
one-dimensional "tp" device mesh: the K/V projections are split by output
features (colwise), so rank r computes and caches K/V heads
[r * H/N, (r+1) * H/N), and the decoder layers' inputs are the whole hidden
state on every rank (the rowwise projections all-reduce). This works on CPU
processes under gloo as it does on GPUs under NCCL. `detect` finds that mesh
from the weights themselves, so nothing private of transformers is read.

HCache on such a model runs in every rank, in lockstep, and every decision
that leads to a collective (how long the stored prefix is, how many layers
are recomputed, whether a layer's chunks were all readable) must come out the
same on every rank, or the ranks would wait on different collectives. Each
rank decides from its own store, then `agree_*` makes the decision common
(the minimum, or rank 0's for choices that rest on timings).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hcache_adapter.manifest import HIDDEN, KV, RECOMPUTE
from hcache_adapter.parallel.shards import Shard

log = logging.getLogger(__name__)


class TensorParallelError(ValueError):
    """A tensor-parallel model HCache cannot serve (an unsupported mesh, heads that do not split evenly)."""


@dataclass
class TensorParallel:
    """This process's place in the model's tensor-parallel group.

    `group` carries the hidden-state all-gathers (NCCL on GPUs, gloo on CPUs);
    `meta_group` carries the small host-side agreements (gloo: host integers
    must not wait on a device stream).
    """

    world: int
    rank: int
    group: Any
    meta_group: Any
    device: torch.device
    mesh: Any = field(default=None, repr=False)

    @property
    def shard(self) -> Shard:
        return Shard(self.world, self.rank)

    # -- agreement (host values, every rank calls each in the same order) ----------------------
    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (the same length on every rank), by rank."""
        mine = torch.tensor(values, dtype=torch.int64)
        out = torch.empty(self.world * len(values), dtype=torch.int64)
        all_gather_single(out, mine, group=self.meta_group)
        return out.view(self.world, len(values)).tolist()

    def agree_min(self, value: int) -> int:
        return min(row[0] for row in self.gather_ints([int(value)]))

    def agree_rank0(self, value: int) -> int:
        """Rank 0's value (for choices resting on timings, which differ between ranks)."""
        return self.gather_ints([int(value)])[0][0]

    def agree_prefix(self, plan: str, chunks: int, layers: int) -> tuple[str, int]:
        """The stored prefix every rank restores, from each rank's (plan, chunks) over `layers` layers.

        A rank that found no manifest has no say (one node's stores need not all
        hold a prefix's manifests: a single process may have saved it into one
        slot); the others must agree on the plan, and the prefix is the longest
        one of them found. Whether the layers' chunks can be read is settled per
        layer at restore time, by every rank together.
        """
        rows = self.gather_ints([chunks, *_plan_code(plan, layers)])
        found = [row for row in rows if row[0] > 0]
        if not found:
            return "", 0
        if any(row[1:] != found[0][1:] for row in found):
            log.warning("tensor-parallel restore: the ranks' stores hold different plans; recomputing")
            return "", 0
        return _plan_of(found[0][1:]), max(row[0] for row in found)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a profile, a few hundred bytes)."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.meta_group, 0), group=self.meta_group)
        return box[0]


_LETTERS = HIDDEN + KV + RECOMPUTE  # a plan letter by its index


def _plan_code(plan: str, layers: int) -> list[int]:
    """A plan as one integer per layer (-1 for layers a plan does not name: no plan)."""
    return [_LETTERS.index(c) for c in plan] + [-1] * (layers - len(plan))


def _plan_of(code: list[int]) -> str:
    return "".join(_LETTERS[c] for c in code if c >= 0)


def all_gather_single(out: torch.Tensor, inp: torch.Tensor, *, group, async_op: bool = False):
    """torch's all-gather into one tensor (named `all_gather_single` from torch 2.13, `all_gather_into_tensor`
    before; same arguments)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def sharded_weight(model: torch.nn.Module):
    """The first DTensor parameter of the model's decoder that is split over its mesh, or None."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor: no tensor parallelism either
        return None
    for p in model.parameters():
        if isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements):
            return p
    return None


def detect(model: torch.nn.Module) -> TensorParallel | None:
    """The tensor-parallel group `model` was loaded over, or None for a model on one device.

    The mesh must be one-dimensional (tensor parallelism alone): a model also
    split by pipeline or data parallelism is refused with a clear error.
    """
    weight = sharded_weight(model)
    if weight is None or not dist.is_initialized():
        return None
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        names = getattr(mesh, "mesh_dim_names", None)
        if names and "tp" in names and all(mesh.size(i) == 1 for i, n in enumerate(names) if n != "tp"):
            mesh = mesh["tp"]
        else:
            raise TensorParallelError(f"HCache handles tensor parallelism alone; this model's mesh is {mesh}")
    world, rank = mesh.size(), mesh.get_local_rank()
    if world == 1:
        return None
    tp_size = getattr(model, "tp_size", None)
    if tp_size not in (None, world):
        raise TensorParallelError(f"model.tp_size is {tp_size} but its weights are split over {world} ranks")
    group = mesh.get_group()
    meta = group if dist.get_backend(group) == "gloo" else _gloo_group(dist.get_process_group_ranks(group))
    device = next(model.parameters()).device
    return TensorParallel(world, rank, group, meta, device, mesh)


_GLOO_GROUPS: dict[tuple[int, ...], Any] = {}


def _gloo_group(ranks: list[int]):
    """A gloo group over `ranks`, made once per process (new_group is collective over the whole world)."""
    key = tuple(ranks)
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(list(ranks), backend="gloo")
    return _GLOO_GROUPS[key]


def local_kv_heads(model: torch.nn.Module, decoder_layers, head_dims) -> tuple[int, ...]:
    """Per layer, the K/V heads this rank computes: its share of the K projection's output features.

    Read from the weights (`to_local()` of the colwise DTensor), not the config,
    which gives the unsharded count.
    """
    heads = []
    for layer, hd in zip(decoder_layers, head_dims):
        k_proj = getattr(getattr(layer, "self_attn", None), "k_proj", None)
        weight = getattr(k_proj, "weight", None)
        if weight is None:
            raise TensorParallelError(f"cannot find the K projection of {type(layer).__name__} to count its heads")
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        if local.shape[0] % hd:
            raise TensorParallelError(f"{local.shape[0]} K features per rank are not whole heads of {hd}: "
                                      "the model's K/V heads do not split over this many ranks")
        heads.append(local.shape[0] // hd)
    return tuple(heads)


def load_tensor_parallel(model_class, path, **kwargs):
    """`model_class.from_pretrained(path, ...)` with transformers' own tensor-parallel plan over every process
    of the default group (what a user or a benchmark does before wrapping the model in HCache)."""
    from transformers.distributed import DistributedConfig

    if not dist.is_initialized():
        raise TensorParallelError("initialise torch.distributed first (one process per device)")
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    return model_class.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"), **kwargs)


def shard_layout(layout, tp: TensorParallel, model: torch.nn.Module, decoder_layers):
    """`layout` for this rank: its own K/V heads per layer, and its shard (K/V keys, hidden chunks it saves)."""
    import dataclasses

    return dataclasses.replace(layout, kv_heads=local_kv_heads(model, decoder_layers, layout.head_dims),
                               shard=tp.shard)

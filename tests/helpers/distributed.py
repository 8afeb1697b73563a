"""Run a function in N CPU processes under a gloo process group (tensor-parallel tests and benchmarks).

`run_ranks(world, fn, *args)` spawns `world` processes; each initialises
torch.distributed (gloo, the environment torchrun would set: RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1), calls `fn(rank, world,
*args)` and hands back what it returned (through a file per rank: spawn
gives no return values). `fn` must be importable (a module-level function).
A rank that raises fails the whole run with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp


TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    torch.set_num_threads(1)  # N processes share the machine's few cores
    # A rank that waits on a collective its peers never reach fails after this instead of hanging the suite.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> list:
    """`fn(rank, world, *args)` in `world` gloo processes; the list of their results by rank."""
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(_entry, args=(world, free_port(), out, fn, args), nprocs=world, join=True,
                               start_method="spawn")
        except mp.ProcessRaisedException:
            pass  # the rank's own traceback is in its file
        results = []
        for rank in range(world):
            path = Path(out) / f"rank{rank}.pt"
            got = torch.load(path, weights_only=False) if path.exists() else {"error": "no result (killed?)"}
            if "error" in got:
                raise RuntimeError(f"rank {rank} of {world} failed:\n{got['error']}")
            results.append(got["ok"])
        return results

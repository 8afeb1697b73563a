"""The machine a benchmark ran on: CPU, RAM, the filesystem and device under its root, the GPU, versions."""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import torch

from hstore.buffers import cuda_available


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _mount_of(path: Path) -> dict:
    """Mount point, filesystem type and source device of `path` (from /proc/self/mountinfo)."""
    path = path.resolve()
    best: dict = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(fields) < 5 or len(rfields) < 2:
                    continue
                mnt = fields[4].replace("\\040", " ")
                if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best.get("mount_point", "")):
                    best = {"mount_point": mnt, "fstype": rfields[0], "source": rfields[1]}
    except OSError:
        pass
    src = best.get("source", "")
    if src.startswith("/dev/"):
        block = Path("/sys/class/block") / Path(src).name
        for d in (block, block.resolve().parent):  # a partition's queue and model live on its disk
            if "device_model" not in best and (d / "device" / "model").is_file():
                best["device_model"] = (d / "device" / "model").read_text().strip()
            if "rotational" not in best and (d / "queue" / "rotational").is_file():
                best["rotational"] = (d / "queue" / "rotational").read_text().strip() == "1"
    return best


def describe_host(root: Path) -> dict:
    """CPU, cores, RAM, the filesystem and device under `root`, the GPU if any, software versions, load."""
    usage = shutil.disk_usage(root)
    gpu = None
    if cuda_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
               "cuda": torch.version.cuda}
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "kernel": platform.release(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "root": str(root.resolve()),
        "fs": _mount_of(root),
        "fs_free_bytes": usage.free,
        "fs_total_bytes": usage.total,
        "gpu": gpu,
    }

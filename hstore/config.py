"""StoreConfig: every knob of a TieredStore, with defaults that work out of the box.

Validated when built (foyer's builder habit): a bad value fails here with a
clear message, not deep inside a tier.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hstore.errors import StoreConfigError
from hstore.format import default_nvme_dir
from hstore.io.engine import IoEngine
from hstore.policy.base import EvictionPolicy
from hstore.tiers.base import RemoteTier
from hstore.tiers.remote.config import RemoteConfig

_MiB = 1 << 20


@dataclass
class StoreConfig:
    """Configuration of a `TieredStore`.

    Capacities are in bytes; a capacity of 0 disables that tier (DRAM cannot be
    disabled: every put lands there first). Policies are given by name
    ("lru", "s3fifo", "cost") or as ready-made policy objects.
    """

    root: str | os.PathLike = "./hstore-data"
    """Directory holding the LMDB index, the lock file and (by default) the NVMe files."""
    dram_bytes: int = 1 << 30
    """Capacity of the host-DRAM tier (pinned when CUDA is present)."""
    nvme_bytes: int = 16 << 30
    """Total capacity of the NVMe tier, split evenly over `nvme_dirs`; 0 disables it."""
    gpu_bytes: int = 0
    """Capacity of the GPU tier; 0 disables it."""
    nvme_dirs: list[str | os.PathLike] | None = None
    """One directory per SSD for round-robin striping; default: `root/nvme`."""
    gpu_device: str = "cuda"
    """Device of the GPU tier. Tests pass "cpu" to exercise its logic without a GPU."""
    eviction: Any = "lru"
    """Eviction policy of every tier: "lru", "s3fifo", "cost", or a factory (e.g. a policy class) called once
    per tier. Never a policy instance: one instance would be shared by every tier (a StoreConfigError says so)."""
    admission: Any = "all"
    """NVMe admission policy: "all", "second-hit", ..., or an AdmissionPolicy."""
    placement: Any = "round-robin"
    """Which NVMe directory receives a new item: "round-robin" or "most-free"."""
    io_engine: str | IoEngine = "auto"
    """"uring", "threads", "auto" (io_uring where the kernel allows it, else threads), or a ready-made
    IoEngine (e.g. a FaultyEngine in tests); an engine given here is the caller's to close."""
    queue_depth: int = 64
    """io_uring submission queue depth (in-flight ops per thread)."""
    io_threads: int = 4
    """Threads serving NVMe reads for batched/async gets."""
    flush_batch_bytes: int = 64 * _MiB
    """The flusher writes dirty DRAM entries to NVMe in batches of about this size."""
    promote_on_hit: bool = True
    """Copy an item read from a lower tier into the tier above (NVMe->DRAM, DRAM->GPU)."""
    pin_dram: bool | None = None
    """Page-lock the DRAM arena; None: when CUDA is available."""
    sync: bool = True
    """fdatasync data and sync the index before an entry becomes visible as durable."""
    verify_reads: bool = True
    """Check the checksum of every chunk read from NVMe (a mismatch is a miss)."""
    put_timeout_s: float = 60.0
    """How long a put waits for the flusher to free DRAM before it raises."""
    background_max_hold_s: float = 0.25
    """How long the flusher may wait before each batch while a caller holds background work back
    (`TieredStore.hold_background()`, e.g. around a restore); 0: holds have no effect."""
    index_map_bytes: int = 1 << 34
    """LMDB map size (virtual; the file grows only as used)."""
    recover_index: bool = False
    """Rebuild the index from the data files' record headers when it is damaged or missing (as
    `hstore recover ROOT` does) instead of refusing to open with an IndexCorruptError."""
    remote: Any = None
    """A tier shared with other stores (read after every local tier, written by the flusher), or None:
    a Redis URL ("redis://[user:password@]host:port/db", "rediss://...", "redis+cluster://host:port"),
    a `hstore.tiers.remote.RemoteConfig`, or a ready RemoteTier (the caller's to close). A URL is parsed
    here into a RemoteConfig, so a bad one fails now and the password never shows in this config's repr."""

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for name in ("dram_bytes", "nvme_bytes", "gpu_bytes", "flush_batch_bytes", "index_map_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StoreConfigError(f"{name} must be a non-negative int, got {value!r}")
        if self.dram_bytes < 64 * 1024:
            raise StoreConfigError(f"dram_bytes must be at least 64 KiB (every put lands in DRAM), got {self.dram_bytes}")
        if self.flush_batch_bytes < 4096:
            raise StoreConfigError("flush_batch_bytes must be at least 4096")
        if not isinstance(self.io_engine, IoEngine) and self.io_engine not in ("auto", "uring", "threads"):
            raise StoreConfigError(
                f"io_engine must be 'auto', 'uring', 'threads' or an IoEngine, got {self.io_engine!r}"
            )
        for name in ("queue_depth", "io_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise StoreConfigError(f"{name} must be a positive int, got {value!r}")
        if self.queue_depth > 4096:
            raise StoreConfigError("queue_depth must be at most 4096")
        if self.nvme_dirs is not None:
            if isinstance(self.nvme_dirs, (str, os.PathLike)):
                raise StoreConfigError("nvme_dirs must be a list of directories, not a single path")
            if len(self.nvme_dirs) == 0:
                raise StoreConfigError("nvme_dirs must not be empty (use nvme_bytes=0 to disable the NVMe tier)")
            dirs = [Path(d).resolve() for d in self.nvme_dirs]
            if len(set(dirs)) != len(dirs):
                raise StoreConfigError(f"nvme_dirs has duplicates: {self.nvme_dirs}")
            self.nvme_dirs = [Path(d) for d in self.nvme_dirs]
        if isinstance(self.eviction, EvictionPolicy):
            raise StoreConfigError(
                f"eviction={self.eviction!r} is a policy instance, which every tier would share; pass a name "
                f"({self.eviction.name!r}) or a factory such as the class ({type(self.eviction).__name__})"
            )
        if not isinstance(self.eviction, str) and not callable(self.eviction):
            raise StoreConfigError(f"eviction must be a policy name or a factory, got {self.eviction!r}")
        if isinstance(self.remote, str):
            self.remote = RemoteConfig(self.remote)  # a bad URL fails here, redacted
        if self.remote is not None and not isinstance(self.remote, (RemoteTier, RemoteConfig)):
            raise StoreConfigError(f"remote must be a URL, a RemoteConfig, a RemoteTier or None, "
                                   f"got {type(self.remote).__name__}")
        if not isinstance(self.recover_index, bool):
            raise StoreConfigError(f"recover_index must be a bool, got {self.recover_index!r}")
        t = self.put_timeout_s
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:  # NaN too
            raise StoreConfigError(f"put_timeout_s must be a positive number of seconds, got {t!r}")
        h = self.background_max_hold_s
        if not isinstance(h, (int, float)) or isinstance(h, bool) or not 0 <= h <= 60:  # NaN too
            raise StoreConfigError(f"background_max_hold_s must be between 0 and 60 seconds, got {h!r}")

    @property
    def nvme_paths(self) -> list[Path]:
        """The directories of the NVMe tier (empty when disabled)."""
        if self.nvme_bytes == 0:
            return []
        return list(self.nvme_dirs) if self.nvme_dirs else [default_nvme_dir(self.root)]

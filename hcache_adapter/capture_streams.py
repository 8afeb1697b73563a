"""Streams that CUDA graphs are captured on, each owned by one group of graphs.

Why: PyTorch keys cuBLAS's workspace by (handle, stream), and a graph keeps the
address of the workspace of the stream it was captured on. The streams of
torch's pool (`torch.cuda.Stream()`) are handed out round-robin, 32 per
priority, so graphs captured at different times on "new" streams share a
workspace more often than not:

* replayed at once on two streams (a restore's projection beside the captured
  forward), their split-K GEMMs write the same scratch memory;
* destroying any one of them (torch >= 2.11 clears its capture stream's
  workspaces in `CUDAGraph.reset`) frees that memory while the others still
  write there (pytorch/pytorch#193402);
* eager GEMMs on a pool stream that a graph was captured on share it too.

Any of these corrupts results or leaves a kernel spinning on a counter. So a
group of graphs that are replayed one at a time and dropped together (a length
bucket's graphs) is captured on a `CaptureStream`: a stream of its own, made
by the CUDA runtime, never from the pool. It goes back to a free list, for the
next group, only when its owner and every graph captured on it are gone (their
workspace entry is cleared as the last graph is destroyed), so a workspace is
never shared by two live groups.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading
import weakref
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

CUDA_STREAM_NON_BLOCKING = 1  # no implicit synchronisation with the legacy default stream (capture-safe)


class StreamLeases:
    """The bookkeeping: raw stream handles lent to owners, back on a free list once the owner and all the graphs
    captured on the stream are gone. `create(device)` makes a new handle (0: none could be made)."""

    def __init__(self, create: Callable[[int], int]):
        self._create = create
        self._free: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self.created = 0

    def lease(self, owner: object, device: int) -> "_Lease":
        """A handle for `owner`'s graphs on `device` (reused when one is free); its `handle` is 0 if none."""
        with self._lock:
            free = self._free.get(device)
            handle = free.pop() if free else 0
        if not handle:
            handle = self._create(device)
            if handle:
                with self._lock:
                    self.created += 1
        lease = _Lease(self, device, handle)
        weakref.finalize(owner, lease.release_one)
        return lease

    def free(self, device: int) -> list[int]:
        with self._lock:
            return list(self._free.get(device, ()))

    def give_back(self, lease: "_Lease") -> None:
        """`lease`'s stream, no longer used by anyone, onto the free list (a handle of 0 never is)."""
        if lease.handle:
            with self._lock:
                self._free.setdefault(lease.device, []).append(lease.handle)


class _Lease:
    """One stream's users: its owner plus each graph captured on it; the stream is free when none is left.

    A graph's finalizer runs as it is deallocated, just before its own reset clears the stream's workspace in
    the same call: no capture can take the stream in between (the interpreter holds the GIL throughout)."""

    def __init__(self, leases: StreamLeases, device: int, handle: int):
        self.leases, self.device, self.handle = leases, device, handle
        self._users = 1  # the owner
        self._lock = threading.Lock()

    def track(self, graph: object) -> None:
        with self._lock:
            if self._users == 0:
                raise RuntimeError("a capture stream was used after its owner and graphs were gone")
            self._users += 1
        weakref.finalize(graph, self.release_one)

    def release_one(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.leases.give_back(self)


@functools.cache
def _loaded_library(stem: str) -> ctypes.CDLL | None:
    """The shared library this process already mapped whose file name starts with `stem` (torch's own; looked
    up once)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" + stem in line}
    except OSError:
        return None
    for path in sorted(paths):
        if path.rsplit("/", 1)[-1].startswith(stem):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def _create_raw_stream(device: int) -> int:
    """A new non-blocking stream on `device` from the CUDA runtime torch loaded (or the driver): 0 if neither
    gives one. Never destroyed: it returns to the free list."""
    handle = ctypes.c_void_p()
    with torch.cuda.device(device):
        runtime = _loaded_library("libcudart.so")
        if runtime is not None and runtime.cudaStreamCreateWithFlags(ctypes.byref(handle),
                                                                     CUDA_STREAM_NON_BLOCKING) == 0:
            return handle.value or 0
        try:
            driver = ctypes.CDLL("libcuda.so.1")
        except OSError:
            return 0
        if driver.cuStreamCreate(ctypes.byref(handle), CUDA_STREAM_NON_BLOCKING) == 0:
            return handle.value or 0
    return 0


LEASES = StreamLeases(_create_raw_stream)
_warned = False


class CaptureStream:
    """A stream that only one group's graph captures use (see the module doc); make the group's graphs with
    `graph()`. Where no stream of its own can be made, it falls back to a pool stream, with a warning."""

    def __init__(self, device: torch.device | int | str, leases: StreamLeases = LEASES):
        dev = torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        self._lease = leases.lease(self, index)
        self.exclusive = bool(self._lease.handle)
        if self.exclusive:
            self.stream = torch.cuda.ExternalStream(self._lease.handle, device=torch.device("cuda", index))
        else:
            global _warned
            if not _warned:
                log.warning("no CUDA stream of its own could be made for graph capture: using torch's pool "
                            "(graphs may share cuBLAS workspaces, pytorch/pytorch#193402)")
                _warned = True
            self.stream = torch.cuda.Stream(device=torch.device("cuda", index))

    def graph(self) -> torch.cuda.CUDAGraph:
        """A new graph to capture on `stream`; the stream stays this group's as long as the graph lives."""
        g = torch.cuda.CUDAGraph()
        self._lease.track(g)
        return g

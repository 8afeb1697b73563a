"""Injected device faults at random points, in both I/O engines: EIO and ENOSPC on writes, EIO and
short transfers on reads, failed fsyncs, each firing on a random share of the ops of a random
workload (put, overwrite, delete, get, get_many_into, flush, drop_cached) against real files.

The invariant, checked on every read: exact or miss, never wrong; and a miss of a key that is
still there is allowed only when the store counted a device fault during that read (the record
could not be read back and was dropped, which is what `io_errors`/`corrupt_chunks` say). Flushed
keys are never lost otherwise: once the faults stop, everything flushes, and after reopening every
key is exactly its last value.
"""
from __future__ import annotations

import errno
import random

import pytest
import torch

from hstore import StoreConfig, StoreIOError, TierFullError, TieredStore
from hstore.io import make_engine
from hstore.testing import FaultyEngine
from tests.helpers.store import ENGINE_KINDS, STORE_DEFAULTS, keyed_tensor, scan_root, tensor_bytes

KEYS = [f"k{i}" for i in range(60)]
STEPS = 700


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape) and tensor_bytes(got) == tensor_bytes(want)


class Run:
    """The workload, a model of what each key holds, and the figures."""

    def __init__(self, store: TieredStore, figures: dict, rng: random.Random):
        self.store, self.figures, self.rng = store, figures, rng
        self.current: dict[str, int | None] = {}

    def device_faults(self) -> int:
        st = self.store.stats()
        return st["io_errors"] + st["corrupt_chunks"]

    def check(self, key: str, got: torch.Tensor | None, budget: list[int]) -> None:
        """`budget[0]`: device faults the store counted during the read that gave `got`, not yet
        used to explain a miss (one fault explains one missing key, no more)."""
        self.figures["keys_checked"] += 1
        version = self.current.get(key)
        if got is None:
            if version is None:
                return
            if budget[0] > 0:  # counted: the store dropped a record it could not read
                budget[0] -= 1
                self.figures["explained_misses"] += 1
                self.current[key] = None if key not in self.store else version
                return
            self.figures["lost"] += 1
        elif version is None or not same(got, keyed_tensor(key, version)):
            self.figures["wrong"] += 1

    def step(self, n: int) -> None:
        rng, store = self.rng, self.store
        key = rng.choice(KEYS)
        r = rng.random()
        if r < 0.55:
            try:
                store.put(key, keyed_tensor(key, n))
                self.current[key] = n
            except (StoreIOError, TierFullError):  # DRAM full of what cannot be flushed: nothing changed
                self.figures["refused_puts"] += 1
        elif r < 0.75:
            before = self.device_faults()
            got = store.get(key)
            self.check(key, got, [self.device_faults() - before])
        elif r < 0.8:
            keys = rng.sample(KEYS, 6)
            want = [self.current.get(k) for k in keys]
            outs = [torch.empty_like(keyed_tensor(k, v)) if v is not None else torch.empty(1) for k, v in zip(keys, want)]
            before = self.device_faults()
            try:
                found = store.get_many_into(keys, outs, promote=rng.random() < 0.5)
            except Exception:  # noqa: BLE001 - a buffer of the wrong size for a key that is gone
                return
            budget = [self.device_faults() - before]
            for k, o, ok in zip(keys, outs, found):
                self.check(k, o if ok else None, budget)
        elif r < 0.85:
            store.delete(key)
            self.current[key] = None
        elif r < 0.95:
            try:
                store.flush()
            except StoreIOError:
                self.figures["failed_flushes"] += 1
        else:
            try:
                store.flush()
                store.drop_cached()  # the next reads go to the device
            except StoreIOError:
                self.figures["failed_flushes"] += 1


@pytest.mark.campaign
@pytest.mark.parametrize("engine_kind", ENGINE_KINDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_random_device_faults_are_misses_never_wrong_and_flushed_keys_stay(tmp_path, campaign_figures, engine_kind, seed):
    figures = campaign_figures
    figures.update(steps=STEPS, faults_injected=0, keys_checked=0, explained_misses=0, failed_flushes=0,
                   refused_puts=0, lost=0, wrong=0)
    engine = FaultyEngine(make_engine(engine_kind, queue_depth=16, workers=2))
    rules = [
        engine.fail(errno.EIO, write=True, p=0.04, seed=seed),
        engine.fail(errno.ENOSPC, write=True, p=0.03, seed=seed + 100),
        engine.fail(errno.EIO, write=False, p=0.03, seed=seed + 200),
        engine.short(keep=4096, write=False, p=0.03, seed=seed + 300),
        engine.fail_fsync(errno.EIO, p=0.03, seed=seed + 400),
    ]
    cfg = StoreConfig(**dict(STORE_DEFAULTS, root=tmp_path / "store", dram_bytes=384 << 10, nvme_bytes=8 << 20,
                             io_engine=engine, put_timeout_s=2.0, flush_batch_bytes=64 << 10))
    rng = random.Random(seed)
    store = TieredStore(cfg)
    try:
        run = Run(store, figures, rng)
        for n in range(1, STEPS + 1):
            run.step(n)
        figures["faults_injected"] = sum(r.fired for r in rules)
        engine.clear()  # the device recovers: everything still held must now flush
        for _ in range(10):
            try:
                store.flush()
                break
            except StoreIOError:
                continue
        assert store.stats()["dirty_items"] == 0
    finally:
        store.close()
    try:
        assert scan_root(cfg.root).problems == []
        with TieredStore(cfg) as again:  # after a clean close every key is exactly its last value
            run.store = again
            for key in KEYS:
                before = run.device_faults()
                got = again.get(key)
                run.check(key, got, [run.device_faults() - before])
    finally:
        engine.close()
    assert figures["faults_injected"] > 20  # the campaign did inject faults
    assert figures["lost"] == 0 and figures["wrong"] == 0, figures

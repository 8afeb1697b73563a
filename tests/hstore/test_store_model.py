"""The store against a model dict (hypothesis stateful): every read answers what the dict holds,
across put / overwrite / delete / flush / evict / reopen, on both engines and every eviction
policy, with an admission policy that declines some values (memory-only) on the way.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hstore import StoreConfig, TieredStore
from hstore.io import uring_available
from tests.helpers.store import SwitchAdmission, ALL_DTYPES, STORE_DEFAULTS, assert_same, random_tensor, scan_root

KiB = 1 << 10
MiB = 1 << 20


# ---------------------------------------------------------------------------- the store as a dict (hypothesis)
_KEYS = st.sampled_from(
    ["a", "b", "ключ", "", "x" * 511, "y" * 1200]
    + [b"a", b"\x00\xff", b"z" * 700, bytes(range(256)) * 3]
)
_SHAPES = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple),
    st.lists(st.integers(1, 40), min_size=1, max_size=2).map(tuple),
    st.tuples(st.integers(1, 3), st.integers(500, 1500)),
)


_ADMIT = st.sampled_from([True, True, False])  # a third of the puts are declined by NVMe: memory-only


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(ALL_DTYPES))
    shape = draw(_SHAPES)
    t = random_tensor(torch.Generator().manual_seed(draw(st.integers(0, 2**31))), dtype, shape)
    view = draw(st.sampled_from(["plain", "transpose", "step"]))
    if view == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif view == "step" and t.dim() >= 1 and t.shape[0] >= 2:
        t = t[::2]
    return t


class StoreMachine(RuleBasedStateMachine):
    """The store against a dict: every read answers what the dict holds, across put / overwrite /
    delete / flush / evict / reopen. Values NVMe declines are memory-only: they may be evicted
    (then missing) and are gone after a reopen, but are never read back as anything else."""

    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="hstore-sm-"))
        self.store: TieredStore | None = None
        self.model: dict[bytes, torch.Tensor] = {}
        self.memory_only: set[bytes] = set()  # keys whose latest value NVMe declined
        self.admission = SwitchAdmission()

    @initialize(engine=st.sampled_from(["threads", "uring"] if uring_available() else ["threads"]),
                eviction=st.sampled_from(["lru", "s3fifo", "cost"]))
    def open(self, engine, eviction):
        # A GPU tier (on CPU memory) smaller than DRAM: promotions, GPU evictions and write-backs happen.
        self.config = StoreConfig(**dict(STORE_DEFAULTS, root=self.root, dram_bytes=128 * KiB, gpu_bytes=64 * KiB,
                                         nvme_bytes=4 * MiB, io_engine=engine, eviction=eviction,
                                         admission=self.admission))
        self.store = TieredStore(self.config)

    @staticmethod
    def norm(k) -> bytes:
        return k.encode() if isinstance(k, str) else k

    def _stored(self, key, value) -> None:
        k = self.norm(key)
        self.model[k] = value.contiguous().clone()
        (self.memory_only.discard if self.admission.open else self.memory_only.add)(k)

    def _forget(self, k: bytes) -> None:
        self.model.pop(k, None)
        self.memory_only.discard(k)

    def _check(self, key, got) -> None:
        k = self.norm(key)
        want = self.model.get(k)
        if want is None:
            assert got is None
        elif got is None:
            assert k in self.memory_only, f"{k[:40]!r} lost"  # only a memory-only value may be evicted
            assert k not in self.store
            self._forget(k)
        else:
            assert_same(got, want)

    @rule(key=_KEYS, value=tensors(), admit=_ADMIT)
    def put(self, key, value, admit):
        self.admission.open = admit
        self.store.put(key, value)
        self._stored(key, value)

    @rule(items=st.lists(st.tuples(_KEYS, tensors()), max_size=4), admit=_ADMIT)
    def put_many(self, items, admit):
        self.admission.open = admit
        self.store.put_many(items)
        for key, value in items:  # in order: a key given twice keeps its last value
            self._stored(key, value)

    @rule(key=_KEYS)
    def get(self, key):
        self._check(key, self.store.get(key))

    @rule(keys=st.lists(_KEYS, max_size=5))
    def get_many(self, keys):
        for k, got in zip(keys, self.store.get_many(keys)):
            self._check(k, got)

    @rule(key=_KEYS)
    def get_into(self, key):
        want = self.model.get(self.norm(key))
        out = torch.empty_like(want) if want is not None else torch.empty(1)
        self._check(key, out if self.store.get_into(key, out) else None)

    @rule(key=_KEYS)
    def delete(self, key):
        k = self.norm(key)
        present = self.store.delete(key)
        assert present == (k in self.model) or (k in self.memory_only and not present)
        self._forget(k)

    @rule()
    def flush(self):
        result = self.store.flush()
        assert self.store.stats()["dirty_items"] == 0
        assert set(result.memory_only) <= self.memory_only  # (a GPU write-back may make one durable)

    @rule()
    def evict(self):
        self.store.drop_cached()  # drops only copies NVMe holds: nothing unflushed or memory-only goes

    @rule()
    def flush_and_evict(self):
        self.store.flush()
        self.store.drop_cached()

    @rule()
    def reopen(self):
        self.store.close()
        report = scan_root(self.root)
        assert report.problems == []
        assert set(self.model) - self.memory_only <= report.keys <= set(self.model)
        self.store = TieredStore(self.config)
        for k in list(self.memory_only):  # memory-only values are gone (unless written back from the GPU)
            if k not in report.keys:
                self._forget(k)
        self.memory_only.clear()
        for k in report.keys:  # and what came back is exactly the latest value, never an older one
            assert_same(self.store.get(k), self.model[k])

    @invariant()
    def same_keys(self):
        keys = set(self.store.keys())
        assert keys <= set(self.model)
        assert set(self.model) - self.memory_only <= keys

    def teardown(self):
        try:
            if self.store is not None:
                st_ = self.store.stats()
                assert st_["corrupt_chunks"] == 0 and st_["io_errors"] == 0
                assert st_["dropped"] <= st_["memory_only_puts"]  # only memory-only values were ever lost
        finally:
            if self.store is not None:
                self.store.close()
            shutil.rmtree(self.root, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_store_behaves_like_a_dict = StoreMachine.TestCase

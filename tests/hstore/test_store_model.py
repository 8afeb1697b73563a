"""The store against a model dict (hypothesis stateful): every read answers what the dict holds,
across flushes, dropped caches and reopens, on both engines and every eviction policy.
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
from tests.helpers.store import ALL_DTYPES, STORE_DEFAULTS, assert_same, random_tensor, scan_root

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
    """The store against a dict: every get answers what the dict holds, across flushes and reopens."""


    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="hstore-sm-"))
        self.store: TieredStore | None = None
        self.model: dict[bytes, torch.Tensor] = {}

    @initialize(engine=st.sampled_from(["threads", "uring"] if uring_available() else ["threads"]),
                eviction=st.sampled_from(["lru", "s3fifo", "cost"]))
    def open(self, engine, eviction):
        # A GPU tier (on CPU memory) smaller than DRAM: promotions, GPU evictions and write-backs happen.
        self.config = StoreConfig(**dict(STORE_DEFAULTS, root=self.root, dram_bytes=128 * KiB, gpu_bytes=64 * KiB,
                                         nvme_bytes=4 * MiB, io_engine=engine, eviction=eviction))
        self.store = TieredStore(self.config)

    @staticmethod
    def norm(k) -> bytes:
        return k.encode() if isinstance(k, str) else k

    @rule(key=_KEYS, value=tensors())
    def put(self, key, value):
        self.store.put(key, value)
        self.model[self.norm(key)] = value.contiguous().clone()

    @rule(items=st.lists(st.tuples(_KEYS, tensors()), max_size=4))
    def put_many(self, items):
        self.store.put_many(items)
        for key, value in items:  # in order: a key given twice keeps its last value
            self.model[self.norm(key)] = value.contiguous().clone()

    @rule(key=_KEYS)
    def get(self, key):
        want = self.model.get(self.norm(key))
        got = self.store.get(key)
        if want is None:
            assert got is None
        else:
            assert_same(got, want)

    @rule(keys=st.lists(_KEYS, max_size=5))
    def get_many(self, keys):
        for k, got in zip(keys, self.store.get_many(keys)):
            want = self.model.get(self.norm(k))
            if want is None:
                assert got is None
            else:
                assert_same(got, want)

    @rule(key=_KEYS)
    def get_into(self, key):
        want = self.model.get(self.norm(key))
        if want is None:
            assert not self.store.get_into(key, torch.empty(1))
            return
        out = torch.empty_like(want)
        assert self.store.get_into(key, out)
        assert_same(out, want)

    @rule(key=_KEYS)
    def delete(self, key):
        assert self.store.delete(key) == (self.model.pop(self.norm(key), None) is not None)

    @rule()
    def flush(self):
        self.store.flush()
        assert self.store.stats()["dirty_items"] == 0

    @rule()
    def drop_cached(self):
        self.store.flush()
        self.store.drop_cached()

    @rule()
    def reopen(self):
        self.store.close()
        report = scan_root(self.root)
        assert report.problems == []
        assert report.keys == set(self.model)
        self.store = TieredStore(self.config)

    @invariant()
    def same_keys(self):
        assert sorted(self.store.keys()) == sorted(self.model)
        assert len(self.store) == len(self.model)

    def teardown(self):
        try:
            if self.store is not None:
                st_ = self.store.stats()
                assert st_["corrupt_chunks"] == 0 and st_["io_errors"] == 0 and st_["dropped"] == 0
        finally:
            if self.store is not None:
                self.store.close()
            shutil.rmtree(self.root, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_store_behaves_like_a_dict = StoreMachine.TestCase

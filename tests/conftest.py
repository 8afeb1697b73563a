"""Fixtures shared by the test suite: stores on tmp_path that are always closed, both I/O engines, and
the figures of the fault campaign (printed at the end of a run)."""
from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # flash_decoding's Triton kernels run interpreted (set before Triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hstore import StoreConfig
from hstore.io import FaultyEngine, make_engine
from tests.helpers.store import ENGINE_KINDS, STORE_DEFAULTS

pytest_plugins = ["tests.helpers.redis_servers"]  # real redis-server fixtures for the remote tier's tests


@pytest.fixture(params=ENGINE_KINDS)
def engine_kind(request) -> str:
    """Each I/O engine the NVMe tier can run on ("threads" always, "uring" where the kernel allows it)."""
    return request.param


@pytest.fixture
def store_config(tmp_path):
    """`store_config(**overrides)`: a small StoreConfig rooted in tmp_path."""

    def make(**overrides) -> StoreConfig:
        kw = dict(STORE_DEFAULTS, root=tmp_path / "store")
        kw.update(overrides)
        return StoreConfig(**kw)

    return make


@pytest.fixture
def open_store(store_config):
    """`open_store(**overrides)`: a TieredStore on a small config; every store opened is closed at teardown."""
    from hstore import TieredStore

    opened = []

    def make(config: StoreConfig | None = None, **overrides):
        store = TieredStore(config if config is not None else store_config(**overrides))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def faulty_engine(engine_kind):
    """A FaultyEngine around a real engine of each kind; pass it as StoreConfig.io_engine."""
    engine = FaultyEngine(make_engine(engine_kind, queue_depth=16, workers=2))
    yield engine
    engine.close()


# ---------------------------------------------------------------------------- the fault campaign's figures
_CAMPAIGN: dict[str, dict] = {}


@pytest.fixture
def campaign_figures(request):
    """A dict a campaign test fills with its figures (kills, keys checked, faults injected, lost,
    wrong, ...); they are printed at the end of the run: `python3 -m pytest -q -m campaign`."""
    figures: dict = {}
    yield figures
    if figures:
        _CAMPAIGN[request.node.nodeid] = figures


def pytest_terminal_summary(terminalreporter):
    if not _CAMPAIGN:
        return
    terminalreporter.section("hstore fault campaign")
    totals: dict[str, int] = {}
    for nodeid, figures in _CAMPAIGN.items():
        terminalreporter.write_line(f"{nodeid}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
        for k, v in figures.items():
            if isinstance(v, int) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
    terminalreporter.write_line("total: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    path = os.environ.get("HSTORE_CAMPAIGN_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"tests": _CAMPAIGN, "total": totals}, f, indent=2)

"""kill -9 at 100+ random moments: after each, every key is exactly as put or a miss, and every key
flushed before the kill is there.

A child (crash_child.py, forked from a zygote that imported torch once) puts, overwrites and
deletes tensors whose content follows from (key, version), flushes, closes and reopens, and logs
what flush() promised. The test SIGKILLs it at random moments, round after round on the same root
(so later rounds open a store that was killed): inside a flush(), right after one returned, inside
close(), or anywhere; after each kill it checks

* an offline scan of the index against the data files finds nothing wrong (and, every tenth
  round, `hstore verify`'s own scan agrees);
* the reopened store serves every key it lists, as a version that was put for it;
* every key logged as flushed is present, at that version or a later one;
* a key whose delete returned is absent, or holds a version put after the delete.

HSTORE_CRASH_SEED=n varies the workload; HSTORE_KILLS=n the number of kills (default 100).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hstore import TieredStore
from hstore.io import uring_available
from hstore.ondisk import verify_store
from tests.helpers.store import keyed_tensor, scan_root, tensor_bytes, version_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash_child  # noqa: E402

HERE = Path(__file__).resolve().parent
MARKER_TIMEOUT_S = 60.0


class Zygote:
    """crash_child.py's zygote: forks children on request, reaps them when asked."""

    def __init__(self, stderr: Path):
        self._err = open(stderr, "wb")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "crash_child.py"), "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, cwd=HERE, text=True, bufsize=1)

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the zygote died: {Path(self._err.name).read_text()[-2000:]}"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._err.close()


def markers(out: Path) -> list[str]:
    return out.read_text().split("\n")[:-1] if out.exists() else []


def wait_for(out: Path, marker: str, count: int) -> None:
    deadline = time.monotonic() + MARKER_TIMEOUT_S
    while True:
        seen = markers(out)
        errors = [m for m in seen if m.startswith("ERROR")]
        assert not errors, errors[0]
        if sum(m == marker for m in seen) >= count:
            return
        assert time.monotonic() < deadline, f"no {count} x {marker} within {MARKER_TIMEOUT_S}s: {seen[-5:]}"
        time.sleep(0.002)


def expectations(log: Path) -> dict[str, tuple[str, int]]:
    """Per key, what the log promises: ("flushed", v): present at version >= v;
    ("deleted", c): absent or at a version > c; ("maybe", 0): any valid version or absent."""
    want: dict[str, tuple[str, int]] = {}
    data = log.read_bytes() if log.exists() else b""
    for line in data.decode().split("\n")[:-1]:  # a torn last record (no newline) is ignored
        kind, key, *rest = line.split()
        if kind == "F":
            want[key] = ("flushed", int(rest[0]))
        elif kind == "D":
            want[key] = ("maybe", 0)
        elif kind == "d":
            want[key] = ("deleted", int(rest[0]))
    return want


def check_after_kill(root: Path, log: Path, round_: int, figures: dict, *, verify: bool) -> list[str]:
    """Every promise the log makes about the killed store; the broken ones, as messages."""
    broken: list[str] = []
    report = scan_root(root)  # our own offline scan, independent of the store's read path
    broken += [f"scan: {p}" for p in report.problems]
    if verify:
        v = verify_store(root, io_engine="threads")  # and `hstore verify`'s
        if v.bad or v.ok != report.entries:
            broken.append(f"verify: {v.as_dict()}")
    want = expectations(log)
    with TieredStore(crash_child.config(str(root), "threads")) as store:
        keys = {k.decode() for k in store.keys()}
        if keys != {k.decode() for k in report.keys}:
            broken.append("the store lists other keys than its index holds")
        for key in sorted(keys):
            got = store.get(key)
            figures["keys_checked"] += 1
            if got is None:
                broken.append(f"{key} is indexed but unreadable")
                figures["lost"] += 1
                continue
            version = version_of(got)
            if tensor_bytes(got) != tensor_bytes(keyed_tensor(key, version)) or got.dtype != keyed_tensor(key, version).dtype \
                    or version >= (round_ + 1) * crash_child.ROUND_STRIDE:
                broken.append(f"{key}: a value that was never put")
                figures["wrong"] += 1
                continue
            kind, bound = want.get(key, ("maybe", 0))
            if kind == "flushed" and version < bound:
                broken.append(f"{key}: flushed at version {bound}, reopened at older {version}")
                figures["wrong"] += 1
            elif kind == "deleted" and version <= bound:
                broken.append(f"{key}: deleted, and came back at version {version}")
                figures["wrong"] += 1
        for key, (kind, bound) in want.items():
            if kind == "flushed" and key not in keys:
                broken.append(f"{key} was flushed (version {bound}) and is gone")
                figures["lost"] += 1
        st = store.stats()
        if st["corrupt_chunks"] or st["io_errors"]:
            broken.append(f"reads failed: {st['corrupt_chunks']} corrupt, {st['io_errors']} I/O errors")
    return broken


@pytest.mark.campaign
def test_kill_9_at_random_moments_never_loses_flushed_data_or_serves_garbage(tmp_path, campaign_figures):
    seed = int(os.environ.get("HSTORE_CRASH_SEED", "20261124"))
    kills = int(os.environ.get("HSTORE_KILLS", "100"))
    root, log = tmp_path / "store", tmp_path / "promises.log"
    rng = random.Random(seed)
    engines = ["uring", "threads"] if uring_available() else ["threads"]
    figures = campaign_figures
    figures.update(kills=0, in_flush=0, after_flush=0, in_close=0, anywhere=0, keys_checked=0, lost=0, wrong=0)
    zygote = Zygote(tmp_path / "zygote.err")
    try:
        for round_ in range(kills):
            engine = engines[round_ % len(engines)]
            out = tmp_path / f"out{round_}"
            cmd = dict(root=str(root), log=str(log), out=str(out), seed=rng.randrange(1 << 30), engine=engine,
                       round=round_)
            pid = zygote.ask(cmd)["pid"]
            mode = ("in_flush", "after_flush", "in_close", "anywhere")[round_ % 4]
            try:
                wait_for(out, "OPEN", 1)
                if mode == "in_flush":
                    wait_for(out, "FLUSH", rng.randint(1, 25))
                elif mode == "after_flush":
                    wait_for(out, "FLUSHED", rng.randint(1, 25))
                elif mode == "in_close":
                    wait_for(out, "CLOSE", rng.randint(1, 3))
                else:
                    time.sleep(rng.uniform(0.0, 1.0))
            finally:
                os.kill(pid, signal.SIGKILL)
                reaped = zygote.ask({"wait": pid})
            assert reaped["signal"] == signal.SIGKILL, f"round {round_}: the child ended by itself: {markers(out)[-3:]}"
            figures["kills"] += 1
            figures[mode] += 1
            broken = check_after_kill(root, log, round_, figures, verify=round_ % 10 == 9)
            assert not broken, f"after kill {round_} ({mode}, {engine}, HSTORE_CRASH_SEED={seed}): {broken[:5]}"
    finally:
        zygote.close()
    assert figures["kills"] >= kills and figures["keys_checked"] > kills  # it did exercise something

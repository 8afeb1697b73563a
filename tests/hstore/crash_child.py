"""The process the kill -9 campaign kills: it opens a store and puts, overwrites and deletes tensors
whose content follows from (key, version), flushes, and now and then closes and reopens the store,
until it is SIGKILLed.

    python crash_child.py zygote                          (what the campaign runs)
    python crash_child.py ROOT LOG OUT SEED ENGINE ROUND  (one child, by hand)

A zygote imports torch and hstore once and then forks one child per command read on stdin
(a JSON line {"root", "log", "out", "seed", "engine", "round"}, answered with {"pid": N}; and
{"wait": pid}, answered with {"pid": N, "signal": S, "code": C} once that child is reaped), so
a hundred kills do not pay a hundred interpreter starts.

A child appends to LOG (one line per record, written with O_APPEND, so a record is either
whole or absent after the kill) what the parent may rely on:
    F key version   flush() returned after `key` was put with `version`: durable
    D key           a delete of `key` is about to start
    d key counter   that delete returned; any later put of `key` has a version > counter
and to OUT the markers "OPEN" (the store is open), "FLUSH" (right before a flush()),
"FLUSHED" (its F records are written), "CLOSE" (right before a close()), so the parent can
aim its kill at a flush, right after one, or inside close(). A child that finds a wrong
value writes "ERROR ..." to OUT and exits 3.
"""
from __future__ import annotations

import json
import os
import random
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo root holds `tests.helpers`

from tests.helpers.store import check_keyed, keyed_tensor  # noqa: E402

from hstore import StoreConfig, TieredStore  # noqa: E402

KEYSPACE = 300
ROUND_STRIDE = 10_000_000  # versions of round r are r * ROUND_STRIDE + step: they grow across rounds
CLOSE_EVERY = 4  # flushes between two close-and-reopen cycles


def config(root: str, engine: str) -> StoreConfig:
    return StoreConfig(root=root, dram_bytes=512 << 10, nvme_bytes=32 << 20, io_engine=engine,
                       io_threads=2, queue_depth=16, flush_batch_bytes=256 << 10, put_timeout_s=30.0)


def run_child(root: str, log_path: str, out_path: str, seed: int, engine: str, round_: int) -> None:
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    out = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def mark(what: str) -> None:
        os.write(out, f"{what}\n".encode())

    store = TieredStore(config(root, engine))
    mark("OPEN")
    pending: dict[str, int] = {}  # put since the last flush: key -> version
    next_flush = rng.randint(3, 20)
    flushes = 0
    for step in range(1, 2_000_000):
        version = round_ * ROUND_STRIDE + step
        key = f"k{rng.randrange(KEYSPACE)}"
        r = rng.random()
        if r < 0.07:
            os.write(log, f"D {key}\n".encode())
            store.delete(key)
            pending.pop(key, None)
            os.write(log, f"d {key} {version}\n".encode())
        elif r < 0.15:
            got = store.get(key)
            if got is not None:
                check_keyed(key, got)
        else:
            store.put(key, keyed_tensor(key, version))
            pending[key] = version
        next_flush -= 1
        if next_flush:
            continue
        mark("FLUSH")
        store.flush()
        if pending:
            os.write(log, "".join(f"F {k} {v}\n" for k, v in pending.items()).encode())
        mark("FLUSHED")
        pending.clear()
        next_flush = rng.randint(3, 20)
        flushes += 1
        if flushes % CLOSE_EVERY == 0:
            mark("CLOSE")
            store.close()
            store = TieredStore(config(root, engine))
            mark("OPEN")
    store.close()


def _guarded(cmd: dict) -> None:
    """The forked child: run, and report a failure in OUT (the parent sees it) instead of a traceback."""
    try:
        run_child(cmd["root"], cmd["log"], cmd["out"], cmd["seed"], cmd["engine"], cmd["round"])
        code = 0
    except BaseException:  # noqa: BLE001 - whatever it was, the parent must learn it
        with open(cmd["out"], "a") as f:
            f.write("ERROR " + traceback.format_exc().replace("\n", " | ") + "\n")
        code = 3
    os._exit(code)


def zygote() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        if "wait" in cmd:
            pid, status = os.waitpid(cmd["wait"], 0)
            reply = {"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                     "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
        else:
            pid = os.fork()
            if pid == 0:
                sys.stdin.close()
                _guarded(cmd)
            reply = {"pid": pid}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        zygote()
    else:
        root, log, out, seed, engine, round_ = sys.argv[1:7]
        run_child(root, log, out, int(seed), engine, int(round_))

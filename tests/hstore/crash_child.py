"""The process test_crash.py kills: it opens a store and puts, overwrites and deletes
tensors whose content follows from (key, version) until it is SIGKILLed.

    python crash_child.py ROOT LOG SEED ENGINE ROUND

It appends to LOG (one line per record, written with O_APPEND, so a record is
either whole or absent after the kill) what the parent may rely on:
    F key version   flush() returned after `key` was put with `version`: durable
    D key           a delete of `key` is about to start
    d key counter   that delete returned; any later put of `key` has a version > counter
and prints "OPEN" once the store is open, "FLUSH" right before each flush() and
"FLUSHED" once its F records are written, so the parent can aim its kill at a
flush or right after one.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo root holds `tests.helpers`

from tests.helpers.store import check_keyed, keyed_tensor

from hstore import StoreConfig, TieredStore

KEYSPACE = 300
ROUND_STRIDE = 10_000_000  # versions of round r are r * ROUND_STRIDE + step: they grow across rounds


def config(root: str, engine: str) -> StoreConfig:
    return StoreConfig(root=root, dram_bytes=512 << 10, nvme_bytes=32 << 20, io_engine=engine,
                       io_threads=2, queue_depth=16, flush_batch_bytes=256 << 10, put_timeout_s=30.0)


def main() -> None:
    root, log_path, seed, engine, round_ = sys.argv[1:6]
    rng = random.Random(int(seed))
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    store = TieredStore(config(root, engine))
    print("OPEN", flush=True)
    pending: dict[str, int] = {}  # put since the last flush: key -> version
    next_flush = rng.randint(3, 20)
    for step in range(1, 200_000):
        version = int(round_) * ROUND_STRIDE + step
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
                check_keyed(key, got)  # an AssertionError ends the child: the parent sees it alive no more
        else:
            store.put(key, keyed_tensor(key, version))
            pending[key] = version
        next_flush -= 1
        if next_flush == 0:
            print("FLUSH", flush=True)
            store.flush()
            if pending:
                os.write(log, "".join(f"F {k} {v}\n" for k, v in pending.items()).encode())
            print("FLUSHED", flush=True)
            pending.clear()
            next_flush = rng.randint(3, 20)
    store.close()


if __name__ == "__main__":
    main()

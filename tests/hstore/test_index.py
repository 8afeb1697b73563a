"""The LMDB index: entries and metadata round trip, long keys by digest, and a damaged file is an
IndexCorruptError naming `hstore recover` (checked before LMDB maps the file: a truncated file or a
bad page number would otherwise kill the process)."""
from __future__ import annotations

import random
import struct

import pytest
import torch

from hstore.errors import IndexCorruptError
from hstore.format import INDEX_DATA_FILE
from hstore.index import Index, IndexEntry
from hstore.lmdbcheck import check_lmdb_file


def entry(key: bytes, i: int = 0) -> IndexEntry:
    return IndexEntry(key, 0, 4096 * i, 8192, 100, torch.float16, (2, 25), 1234 + i, 1.5, 2.5, i)


@pytest.fixture
def filled(tmp_path):
    path = tmp_path / "index"
    idx = Index(path)
    idx.put_many([entry(b"k%d" % i, i) for i in range(300)])
    idx.meta_put("layout", b"{}")
    idx.close()
    return path


def test_entries_and_metadata_round_trip(tmp_path):
    idx = Index(tmp_path / "index")
    try:
        long = b"x" * 5000
        idx.put_many([entry(b"a", 1), entry(long, 2), entry(b"", 3)])
        assert idx.get(b"a") == entry(b"a", 1) and idx.get(long) == entry(long, 2) and idx.get(b"") == entry(b"", 3)
        assert len(idx) == 3 and sorted(e.key for e in idx.items()) == sorted([b"a", long, b""])
        idx.delete_many([b"a", b"never"])
        assert idx.get(b"a") is None and len(idx) == 2
        assert idx.meta_get("layout") is None
        idx.meta_put("layout", b"{}")
        assert idx.meta_get("layout") == b"{}"
    finally:
        idx.close()


def test_a_sound_file_passes_the_check(filled):
    assert check_lmdb_file(filled / INDEX_DATA_FILE) is None
    assert check_lmdb_file(filled / "absent.mdb") is None


@pytest.mark.parametrize("damage", ["truncate", "zero-meta", "page-number", "node-offset"])
def test_damage_is_an_error_naming_the_recover_command(filled, damage):
    f = filled / INDEX_DATA_FILE
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "zero-meta":
        data[: 2 * 4096] = bytes(2 * 4096)
    elif damage == "page-number":  # every page says it is another page
        for page in range(2, len(data) // 4096):
            struct.pack_into("<Q", data, page * 4096, 10**9)
    else:  # every node pointer of every page points past the page
        for page in range(2, len(data) // 4096):
            lower = struct.unpack_from("<H", data, page * 4096 + 12)[0]
            for at in range(page * 4096 + 16, page * 4096 + min(lower, 4096), 2):
                struct.pack_into("<H", data, at, 65000)
    f.write_bytes(bytes(data))
    assert check_lmdb_file(f) is not None
    with pytest.raises(IndexCorruptError, match=f"hstore recover {filled.parent}"):
        Index(filled)


def test_random_byte_flips_never_crash_the_process(filled):
    # Whatever the check lets through, LMDB can read without SIGBUS or SIGSEGV, in a child process.
    import subprocess
    import sys

    good = (filled / INDEX_DATA_FILE).read_bytes()
    code = ("import sys\nfrom pathlib import Path\nfrom hstore.index import Index\nfrom hstore.errors import "
            "IndexCorruptError\ntry:\n    i = Index(Path(sys.argv[1]))\n    n = sum(1 for _ in i.items())\n"
            "    print('ok', n)\nexcept IndexCorruptError:\n    print('refused')\n")
    outcomes = []
    for seed in range(5):
        rng = random.Random(seed)
        data = bytearray(good)
        for _ in range(20):
            data[rng.randrange(8192, len(data))] ^= 0xFF
        (filled / INDEX_DATA_FILE).write_bytes(bytes(data))
        proc = subprocess.run([sys.executable, "-c", code, str(filled)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (seed, proc.returncode, proc.stderr[-500:])
        outcomes.append(proc.stdout.split()[0])
    assert set(outcomes) <= {"ok", "refused"}

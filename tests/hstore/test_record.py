"""Record headers: format 2 round trips (keys of every length, every dtype, up to 32 dimensions),
format 1 headers still parse, and a header with any byte changed, or a foreign block, is refused."""
from __future__ import annotations

import struct

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from hstore.format import RECORD_MAGIC_V1
from hstore.record import (
    DTYPE_TO_CODE,
    HEADER_BYTES,
    MAX_INLINE_KEY,
    MAX_NDIM,
    RecordHeader,
    dtype_code,
    key_digest,
)

DTYPES = sorted(DTYPE_TO_CODE, key=str)
KEYS = st.one_of(st.binary(max_size=64), st.binary(min_size=MAX_INLINE_KEY - 2, max_size=MAX_INLINE_KEY + 2))
SHAPES = st.lists(st.integers(0, 2**40), max_size=MAX_NDIM).map(tuple)


@settings(max_examples=200, deadline=None)
@given(key=KEYS, dtype=st.sampled_from(DTYPES), shape=SHAPES, nbytes=st.integers(0, 2**50),
       csum=st.integers(0, 2**64 - 1), seq=st.integers(0, 2**64 - 1))
def test_format_2_headers_round_trip(key, dtype, shape, nbytes, csum, seq):
    hdr = RecordHeader.for_item(key, dtype, shape, nbytes, csum, seq)
    block = hdr.pack()
    assert len(block) == HEADER_BYTES
    back = RecordHeader.unpack(block)
    assert back == hdr and back.version == 2 and back.seq == seq
    assert (back.key is None) == (len(key) > MAX_INLINE_KEY)  # long keys: only the digest
    assert back.names(key) and not back.names(key + b"x")
    assert back.describes(key, dtype, shape, nbytes, csum)
    assert not back.describes(key, dtype, shape + (1,), nbytes, csum)


@settings(max_examples=60, deadline=None)
@given(key=st.binary(max_size=40), at=st.integers(0, 200), mask=st.integers(1, 255))
def test_a_changed_byte_makes_the_header_invalid(key, at, mask):
    block = bytearray(RecordHeader.for_item(key, torch.float32, (3, 4), 48, 7, 9).pack())
    end = 64 + 16 + len(key) + 8  # fixed part, two dims, the key, the header's checksum
    at = at % end
    block[at] ^= mask
    assert RecordHeader.unpack(bytes(block)) is None


def v1_block(key: bytes, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int, csum: int) -> bytes:
    """A format 1 header, laid out as the code before format 2 wrote it."""
    body = struct.pack("<8sHHHxxQQ16s", RECORD_MAGIC_V1, 0, dtype_code(dtype), len(shape), nbytes, csum, key_digest(key))
    body += b"".join(struct.pack("<Q", d) for d in shape)
    body += struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    return body + bytes(HEADER_BYTES - len(body))


def test_format_1_headers_parse_with_only_a_digest():
    hdr = RecordHeader.unpack(v1_block(b"key", torch.int16, (2, 5), 20, 1234))
    assert hdr is not None and hdr.version == 1 and hdr.key is None and hdr.seq == 0
    assert hdr.describes(b"key", torch.int16, (2, 5), 20, 1234)
    assert not hdr.names(b"other")


@pytest.mark.parametrize("block", [bytes(HEADER_BYTES), b"HSTORE\x00\x09" + bytes(HEADER_BYTES - 8), b"short"])
def test_foreign_blocks_are_not_headers(block):
    assert RecordHeader.unpack(block) is None

"""What one value of the remote tier is: a small self-describing header, then the payload.

    magic "HSRV" | format version | flags | dtype code | ndim | payload bytes | payload xxh3-64
    | key digest (16 bytes) | ndim dims (u64 each) | xxh3-64 of everything before it

Unlike the NVMe record (a 4 KiB, sector-aligned header) this header is 52 + 8*ndim bytes: a
value is one Redis string and nothing needs alignment. A value read back is used only when its
header checksum, format version, key digest, dtype, shape, length and payload checksum all
agree; anything else is a miss (navy: every entry carries its key and a checksum).

Keys upstream are content hashes, so two nodes writing the same key write these same bytes:
whichever SET lands last, the value is identical, and a racing reader sees one or the other.
"""
from __future__ import annotations

import enum
import struct
import warnings

import torch

from hstore.errors import InvalidItemError
from hstore.record import CODE_TO_DTYPE, MAX_NDIM, checksum, dtype_code, key_digest
from hstore.tiers.base import RemoteRecord

MAGIC = b"HSRV"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sBBHH2xQQ16s")  # magic, version, flags, dtype, ndim, nbytes, payload sum, key digest
_DIM = struct.Struct("<Q")
_SUM = struct.Struct("<Q")

# torch warns once per process that a tensor over an immutable buffer could be written through.
# The payloads handed out are read-only views over the bytes the client received (no copy; the
# store copies out of them), so that one warning is spent here rather than at a user's first hit.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)


class Verdict(enum.Enum):
    OK = "ok"
    CORRUPT = "corrupt"  # not a record of this key as written: a miss, and the value is deleted
    NEWER_FORMAT = "newer_format"  # written by a newer hstore: a miss, but left for the nodes that read it


def header_size(ndim: int) -> int:
    return _FIXED.size + ndim * _DIM.size + _SUM.size


def encode_header(key: bytes, dtype: torch.dtype, shape: tuple[int, ...], payload: memoryview) -> bytes:
    """The header to send before `payload` (whose checksum it carries)."""
    if len(shape) > MAX_NDIM:
        raise InvalidItemError(f"at most {MAX_NDIM} dimensions, got {len(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize != payload.nbytes:
        raise InvalidItemError(f"shape {shape} of {dtype} is {numel * dtype.itemsize} bytes, the payload "
                               f"{payload.nbytes}")
    body = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, dtype_code(dtype), len(shape), payload.nbytes,
                       checksum(payload), key_digest(key))
    body += b"".join(_DIM.pack(d) for d in shape)
    return body + _SUM.pack(checksum(body))


def decode(key: bytes, value: bytes) -> tuple[RemoteRecord | None, Verdict]:
    """The record in `value` if it is `key`'s and intact, else (None, why)."""
    if len(value) < _FIXED.size + _SUM.size:
        return None, Verdict.CORRUPT
    magic, version, _flags, code, ndim, nbytes, payload_sum, digest = _FIXED.unpack_from(value, 0)
    if magic != MAGIC:
        return None, Verdict.CORRUPT
    if version > FORMAT_VERSION:
        return None, Verdict.NEWER_FORMAT
    hsize = header_size(ndim)
    if version != FORMAT_VERSION or ndim > MAX_NDIM or len(value) < hsize:
        return None, Verdict.CORRUPT
    view = memoryview(value)
    (header_sum,) = _SUM.unpack_from(value, hsize - _SUM.size)
    if header_sum != checksum(view[: hsize - _SUM.size]):
        return None, Verdict.CORRUPT
    dtype = CODE_TO_DTYPE.get(code)
    shape = struct.unpack_from(f"<{ndim}Q", value, _FIXED.size)
    numel = 1
    for d in shape:
        numel *= d
    if (dtype is None or digest != key_digest(key) or len(value) != hsize + nbytes
            or numel * dtype.itemsize != nbytes or checksum(view[hsize:]) != payload_sum):
        return None, Verdict.CORRUPT
    if nbytes == 0:
        payload = torch.empty(0, dtype=torch.uint8)
    else:
        payload = torch.frombuffer(value, dtype=torch.uint8, offset=hsize, count=nbytes)
    return RemoteRecord(dtype, tuple(shape), payload), Verdict.OK

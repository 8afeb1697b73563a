"""What an item looks like on a persistent tier: a 4 KiB header, then the payload.

The header carries the key's digest, the tensor's dtype and shape, the payload
length and the payload checksum, and a checksum of itself (navy: every entry on
flash carries a checksum and its key). A read that finds a header or payload
that does not match what the index expects is a miss, never data.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from hstore.errors import InvalidItemError

HEADER_BYTES = 4096
MAGIC = b"HSTORE\x00\x01"
MAX_NDIM = 32

# Stable on-disk codes: never renumber, only append.
_DTYPE_NAMES = [
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
    "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
    "uint16", "uint32", "uint64",
]
DTYPE_TO_CODE: dict[torch.dtype, int] = {}
CODE_TO_DTYPE: dict[int, torch.dtype] = {}
for _code, _name in enumerate(_DTYPE_NAMES, start=1):
    _dt = getattr(torch, _name, None)
    if isinstance(_dt, torch.dtype):
        DTYPE_TO_CODE[_dt] = _code
        CODE_TO_DTYPE[_code] = _dt

# magic, flags, dtype, ndim, payload_nbytes, payload_checksum, key_digest
_FIXED = struct.Struct("<8sHHHxxQQ16s")
_SHAPE_DIM = struct.Struct("<Q")
_HEADER_SUM = struct.Struct("<Q")


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_TO_CODE[dtype]
    except KeyError:
        raise InvalidItemError(f"dtype {dtype} cannot be stored") from None


def key_digest(key: bytes) -> bytes:
    """16-byte digest identifying a key inside a record header."""
    return hashlib.blake2b(key, digest_size=16).digest()


def checksum(data: torch.Tensor | memoryview | bytes) -> int:
    """xxh3-64 of a contiguous CPU byte tensor (or any buffer). Releases the GIL for large inputs."""
    if isinstance(data, torch.Tensor):
        data = data.numpy() if data.numel() else b""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True, slots=True)
class RecordHeader:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    checksum: int
    key_digest: bytes

    def pack(self) -> bytes:
        """The HEADER_BYTES-long header block."""
        body = _FIXED.pack(MAGIC, 0, dtype_code(self.dtype), len(self.shape), self.nbytes, self.checksum, self.key_digest)
        body += b"".join(_SHAPE_DIM.pack(d) for d in self.shape)
        body += _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(body))
        return body + bytes(HEADER_BYTES - len(body))

    @classmethod
    def unpack(cls, block: bytes | memoryview | np.ndarray) -> "RecordHeader | None":
        """Parse a header block; None when it is not a valid header (torn, foreign, corrupt)."""
        block = bytes(memoryview(block)[: _FIXED.size + MAX_NDIM * 8 + 8])
        try:
            magic, _flags, code, ndim, nbytes, csum, digest = _FIXED.unpack_from(block, 0)
        except struct.error:
            return None
        if magic != MAGIC or ndim > MAX_NDIM or code not in CODE_TO_DTYPE:
            return None
        end = _FIXED.size + ndim * 8
        (stored_sum,) = _HEADER_SUM.unpack_from(block, end)
        if stored_sum != xxhash.xxh3_64_intdigest(block[:end]):
            return None
        shape = struct.unpack_from(f"<{ndim}Q", block, _FIXED.size)
        return cls(CODE_TO_DTYPE[code], shape, nbytes, csum, digest)

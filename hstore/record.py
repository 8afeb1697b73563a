"""What an item looks like on a persistent tier: a 4 KiB self-describing header, then the payload.

The header carries the key (version 2: the key itself when it fits, else only its digest;
version 1: only the digest), the tensor's dtype and shape, the payload length and checksum,
a write sequence number (version 2) and a checksum of itself (navy: every entry on flash
carries a checksum and its key). A read whose header or payload does not match what the
index expects is a miss, never data; and because a version 2 header names its key, a lost
index can be rebuilt from the data files alone (`hstore.recovery`).

Both versions are read; only version 2 is written.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from hstore.errors import InvalidItemError
from hstore.format import RECORD_HEADER_BYTES, RECORD_MAGIC_V1, RECORD_MAGIC_V2

HEADER_BYTES = RECORD_HEADER_BYTES
MAGIC = RECORD_MAGIC_V2
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

# v1: magic, flags, dtype, ndim, payload_nbytes, payload_checksum, key_digest; then dims, header sum
_FIXED_V1 = struct.Struct("<8sHHHxxQQ16s")
# v2: magic, flags, dtype, ndim, payload_nbytes, payload_checksum, key_digest, seq, key_len; then dims,
# the key (when FLAG_KEY_INLINE), header sum
_FIXED_V2 = struct.Struct("<8sHHHxxQQ16sQIxxxx")
_DIM = struct.Struct("<Q")
_HEADER_SUM = struct.Struct("<Q")
FLAG_KEY_INLINE = 0x1
MAX_INLINE_KEY = HEADER_BYTES - _FIXED_V2.size - MAX_NDIM * _DIM.size - _HEADER_SUM.size
"""Keys up to this long are kept whole in a v2 header; longer ones only as a digest (not recoverable)."""


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
    """A parsed header. `key` is None when the header holds only the digest (v1, or a very long key)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    checksum: int
    key_digest: bytes
    key: bytes | None = None
    seq: int = 0
    version: int = 2

    @classmethod
    def for_item(cls, key: bytes, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int, csum: int,
                 seq: int) -> "RecordHeader":
        """The v2 header of a new record."""
        inline = key if len(key) <= MAX_INLINE_KEY else None
        return cls(dtype, tuple(shape), nbytes, csum, key_digest(key), inline, seq, 2)

    def names(self, key: bytes) -> bool:
        """Whether this record is `key`'s (the whole key where the header has it, else its digest)."""
        if self.key is not None:
            return self.key == key
        return self.key_digest == key_digest(key)

    def describes(self, key: bytes, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int, csum: int) -> bool:
        """Whether this is the record an index entry (key, dtype, shape, size, checksum) expects."""
        return (self.nbytes == nbytes and self.checksum == csum and self.dtype == dtype
                and self.shape == tuple(shape) and self.names(key))

    def pack(self) -> bytes:
        """The HEADER_BYTES-long v2 header block."""
        key = self.key or b""
        flags = FLAG_KEY_INLINE if self.key is not None else 0
        body = _FIXED_V2.pack(RECORD_MAGIC_V2, flags, dtype_code(self.dtype), len(self.shape), self.nbytes,
                              self.checksum, self.key_digest, self.seq, len(key))
        body += b"".join(_DIM.pack(d) for d in self.shape) + key
        body += _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(body))
        return body + bytes(HEADER_BYTES - len(body))

    @classmethod
    def unpack(cls, block: bytes | memoryview | np.ndarray) -> "RecordHeader | None":
        """Parse a v1 or v2 header block; None when it is not a valid header (torn, foreign, corrupt)."""
        view = memoryview(block)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        magic = bytes(view[:8])
        if magic == RECORD_MAGIC_V2:
            return cls._unpack_v2(view)
        if magic == RECORD_MAGIC_V1:
            return cls._unpack_v1(bytes(view[: _FIXED_V1.size + MAX_NDIM * 8 + 8]))
        return None

    @classmethod
    def _unpack_v1(cls, block: bytes) -> "RecordHeader | None":
        try:
            _magic, _flags, code, ndim, nbytes, csum, digest = _FIXED_V1.unpack_from(block, 0)
        except struct.error:
            return None
        if ndim > MAX_NDIM or code not in CODE_TO_DTYPE:
            return None
        end = _FIXED_V1.size + ndim * 8
        (stored_sum,) = _HEADER_SUM.unpack_from(block, end)
        if stored_sum != xxhash.xxh3_64_intdigest(block[:end]):
            return None
        shape = struct.unpack_from(f"<{ndim}Q", block, _FIXED_V1.size)
        return cls(CODE_TO_DTYPE[code], shape, nbytes, csum, digest, None, 0, 1)

    @classmethod
    def _unpack_v2(cls, view: memoryview) -> "RecordHeader | None":
        if len(view) < HEADER_BYTES:
            return None
        _magic, flags, code, ndim, nbytes, csum, digest, seq, key_len = _FIXED_V2.unpack_from(view, 0)
        inline = bool(flags & FLAG_KEY_INLINE)
        if ndim > MAX_NDIM or code not in CODE_TO_DTYPE or (inline and key_len > MAX_INLINE_KEY):
            return None
        dims_end = _FIXED_V2.size + ndim * 8
        end = dims_end + (key_len if inline else 0)
        (stored_sum,) = _HEADER_SUM.unpack_from(view, end)
        if stored_sum != xxhash.xxh3_64_intdigest(view[:end]):
            return None
        shape = struct.unpack_from(f"<{ndim}Q", view, _FIXED_V2.size)
        key = bytes(view[dims_end:end]) if inline else None
        return cls(CODE_TO_DTYPE[code], shape, nbytes, csum, digest, key, seq, 2)

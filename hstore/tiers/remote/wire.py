"""RESP encoding that sends payloads from the tensor's own memory.

With hiredis installed, redis-py packs each command into one new buffer (and first turns a
memoryview into bytes): two copies of every payload before the socket sees it, and a value made
of a header plus a payload would need a third to concatenate them. `ZeroCopyPacker` emits
`$<len>\\r\\n`, the header, the payload's memoryview and `\\r\\n` as separate chunks that
`sendall` sends from where they lie, so a SET copies nothing in Python. It plugs into redis-py
through the connection's `command_packer` argument; replies are still parsed by hiredis.
"""
from __future__ import annotations

from typing import Sequence

import redis
from redis.exceptions import DataError

_SEPARATE = 6000  # chunks larger than this are sent as they are (redis-py joins the small ones)


class SplitValue:
    """One bulk-string argument sent from several buffers (a header and a payload view)."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: Sequence[bytes | memoryview]):
        self.parts = tuple(p if not isinstance(p, memoryview) else _flat(p) for p in parts)
        self.nbytes = sum(len(p) for p in self.parts)


def _flat(view: memoryview) -> memoryview:
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _encode(arg) -> bytes | memoryview:
    if isinstance(arg, (bytes, memoryview)):
        return arg
    if isinstance(arg, bytearray):
        return bytes(arg)
    if isinstance(arg, bool):
        raise DataError("Invalid input of type: 'bool'")
    if isinstance(arg, (int, float)):
        return repr(arg).encode()
    if isinstance(arg, str):
        return arg.encode()
    raise DataError(f"Invalid input of type: {type(arg).__name__!r}")


class ZeroCopyPacker:
    """`pack(*args)` -> the chunks of one RESP command; big buffers are passed through, not copied."""

    def pack(self, *args) -> list[bytes | memoryview]:
        # redis-py spells some commands as one argument with a space ("CLUSTER SLOTS")
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        out: list[bytes | memoryview] = []
        small: list[bytes] = [b"*%d\r\n" % len(args)]
        for arg in args:
            parts = arg.parts if isinstance(arg, SplitValue) else (_encode(arg),)
            small.append(b"$%d\r\n" % sum(len(p) for p in parts))
            for part in parts:
                if len(part) > _SEPARATE or isinstance(part, memoryview):
                    out.append(b"".join(small))
                    small = []
                    out.append(part)
                else:
                    small.append(part)
            small.append(b"\r\n")
        out.append(b"".join(small))
        return out


class ZeroCopyConnection(redis.Connection):
    """A TCP connection that packs with ZeroCopyPacker."""

    def __init__(self, **kwargs):
        super().__init__(command_packer=ZeroCopyPacker(), **kwargs)


class ZeroCopySSLConnection(redis.SSLConnection):
    """A TLS connection that packs with ZeroCopyPacker (TLS encrypts from the same buffers)."""

    def __init__(self, **kwargs):
        super().__init__(command_packer=ZeroCopyPacker(), **kwargs)

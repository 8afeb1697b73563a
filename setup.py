"""Build hook for the optional io_uring binding (cffi API mode).

Everything else lives in pyproject.toml. The binding is built only where
liburing's header is present (Debian: liburing-dev); without it hstore falls
back to a thread pool of preadv/pwritev at run time.
"""
import os

from setuptools import setup

HEADER_DIRS = ["/usr/include", "/usr/local/include"]
have_liburing = os.environ.get("HSTORE_NO_URING") != "1" and any(
    os.path.exists(os.path.join(d, "liburing.h")) for d in HEADER_DIRS
)

setup(cffi_modules=["hstore/io/_uring_build.py:ffibuilder"] if have_liburing else [])

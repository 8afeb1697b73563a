#!/usr/bin/env bash
# Install everything hstore + hcache_adapter need on a fresh Debian/Ubuntu machine:
# liburing (for the io_uring binding), the CPU build of torch when no torch is
# present, then this project in editable mode with its test and plot extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -f /usr/include/liburing.h ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q liburing-dev >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q liburing-dev >/dev/null; }
  else
    echo "install.sh: no apt-get and no liburing-dev: the NVMe tier will use its thread-pool engine" >&2
  fi
fi

# An unpinned torch would pull a multi-GB CUDA build; keep an existing torch, else take 2.13.0.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test,plot]"
$PY -c "import hstore.io as io; print('hstore: io engine', 'io_uring' if io.uring_available() else 'threads (' + str(io.uring_unavailable_reason()) + ')')"

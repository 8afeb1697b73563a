#!/usr/bin/env bash
# Install everything hstore + hcache_adapter need on a fresh Debian/Ubuntu machine:
# liburing (for the io_uring binding), redis-server and openssl (the remote tier's
# tests), the CPU build of torch when no torch is present, then this project in
# editable mode with its test extra (which pulls in redis + hiredis) and plot extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
apt_install() {  # apt_install WHAT-FOR PACKAGE...: quietly, updating the lists only if the first try fails
  local why=$1; shift
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: no apt-get to install $*: $why" >&2
    return 0
  fi
  $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "$@" >/dev/null; }
}

[ -f /usr/include/liburing.h ] || apt_install "the NVMe tier will use its thread-pool engine" liburing-dev
# The remote tier's tests start their own redis-server processes (standalone, TLS, a cluster via redis-cli).
command -v redis-server >/dev/null 2>&1 || apt_install "the remote tier's tests will be skipped" redis-server
command -v openssl >/dev/null 2>&1 || apt_install "the remote tier's TLS test will be skipped" openssl

# An unpinned torch would pull a multi-GB CUDA build; keep an existing torch, else take 2.13.0.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test,plot]"
$PY -c "import hstore.io as io; print('hstore: io engine', 'io_uring' if io.uring_available() else 'threads (' + str(io.uring_unavailable_reason()) + ')')"
if command -v redis-server >/dev/null 2>&1; then
  echo "hstore: remote tier tests on $(redis-server --version | cut -d' ' -f3), redis-py $($PY -c 'import redis; print(redis.__version__)')"
fi

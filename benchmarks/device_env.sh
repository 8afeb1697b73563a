# Sourced by the run_final_*.sh stages on the GPU machine: installs the carried .devdeps, puts this checkout
# first on PYTHONPATH, builds the io_uring binding, and prints the GPU. Logs go under $OUT.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
source .devdeps/install.sh >/dev/null 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

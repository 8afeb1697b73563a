#!/usr/bin/env bash
# One device call: install the GPU machine's missing packages, build the io_uring binding,
# run the tests (GPU ones included) and a quick benchmark. Writes logs under $OUT.
set -uo pipefail
source .devdeps/install.sh
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -x tests/test_gpu.py -s 2>&1 | tee $OUT/gpu_tests.log | tail -15

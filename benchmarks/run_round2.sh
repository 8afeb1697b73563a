#!/usr/bin/env bash
# GPU round 2: tests, the store's hot path on CUDA, the TTFT breakdown and a quick bench (logs under $OUT).
set -uo pipefail
source .devdeps/install.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q >/dev/null 2>&1
timeout 240 python3 -m pytest -q -x -s -p no:cacheprovider tests/hcache/test_gpu.py > $OUT/gpu_tests.log 2>&1; tail -3 $OUT/gpu_tests.log; grep -E "fp16|error" $OUT/gpu_tests.log | head
timeout 60 python3 benchmarks/hstore_read_overhead.py --device cuda > $OUT/read_overhead.log 2>&1; tail -6 $OUT/read_overhead.log
timeout 200 python3 benchmarks/ttft_breakdown.py --model llama2-7b --context 4096 > $OUT/breakdown.log 2>&1; grep "^|\|bytes/token" $OUT/breakdown.log
timeout 240 python3 -m hcache_adapter bench --models llama2-7b --contexts 1024,4096 --nvme-contexts 4096 --repeat 5 --warmup 2 --long-repeat 3 --no-progress --out $OUT/quick > $OUT/quick.log 2>&1; grep "^|\|###" $OUT/quick.log | head -40; tail -3 $OUT/quick.log

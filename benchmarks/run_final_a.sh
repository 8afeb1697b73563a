#!/usr/bin/env bash
# Final GPU call A: the GPU tests, `hcache bench` (both shapes, 1K..32K, DRAM and NVMe), TBT while saving.
set -uo pipefail
source .devdeps/install.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q >/dev/null 2>&1
mkdir -p $OUT/results
timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/hcache/test_gpu.py > $OUT/gpu_tests.log 2>&1; tail -2 $OUT/gpu_tests.log
timeout 440 python3 -m hcache_adapter bench --no-progress --out $OUT/results --contexts 1024,4096,16384,32768 \
  --nvme-contexts 4096,16384 --nvme-methods recompute,kv,hcache,auto --long-methods recompute,ideal,hf_offloaded,kv,hcache,auto \
  --repeat 9 --warmup 3 --long-repeat 5 --long-warmup 2 > $OUT/results/full.log 2>&1
grep "^|\|###" $OUT/results/full.log | grep -v "copy floor" | head -120 | cut -c1-120
tail -2 $OUT/results/full.log
timeout 100 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024 --sources dram --methods hcache \
  --repeat 1 --warmup 1 --tbt-context 1024 --tbt-tokens 64 --tbt-pairs 4 --out $OUT/tbt > $OUT/tbt.log 2>&1; grep "TBT" $OUT/tbt.log

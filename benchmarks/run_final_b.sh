#!/usr/bin/env bash
# Final GPU call B: the GQA shape's bench, serve-bench (7B), the Redis tier against raw redis-py.
set -uo pipefail
source .devdeps/install.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q >/dev/null 2>&1
mkdir -p $OUT/gqa $OUT/serve
timeout 200 python3 -m hcache_adapter bench --no-progress --models llama3-8b --out $OUT/gqa --contexts 1024,4096,16384 \
  --nvme-contexts 4096 --repeat 9 --warmup 2 --long-repeat 3 --long-warmup 1 --dram-gib 24 --nvme-gib 12 > $OUT/gqa/full.log 2>&1
grep "^|\|###" $OUT/gqa/full.log | grep -v "copy floor" | cut -c1-110 | head -60
timeout 200 python3 -m hcache_adapter serve-bench --preset gpu-7b --time-limit-s 140 --no-progress --out $OUT/serve > $OUT/serve/log 2>&1; tail -25 $OUT/serve/log
timeout 50 python3 benchmarks/remote_bench.py --out $OUT > $OUT/remote.log 2>&1; tail -15 $OUT/remote.log

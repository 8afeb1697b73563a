#!/usr/bin/env bash
# GPU call of the seventeenth session (344 s of device time were left):  bash benchmarks/run_final_q.sh A
#   (carry .devdeps; logs under $OUT).
#   A: `hcache bench` of the 7B shape at 4K from DRAM only, median of 9 after 2 warm-ups (the issue's
#      repetitions), every method that row's targets name: recompute, "ideal", hcache, auto (and the copy
#      floor the bench prints beside them), on this session's code (prompt digests packed with struct).
source benchmarks/device_env.sh

case "${1:-A}" in
  A)
    echo "=== 7B/4K $(date +%T)"
    mkdir -p $OUT/short
    timeout "${BENCH_SECONDS:-230}" python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 4096 \
      --sources dram --methods recompute,ideal,hcache,auto --repeat 9 --warmup 2 --out $OUT/short > $OUT/short/full.log 2>&1
    grep "^|\|###" $OUT/short/full.log | cut -c1-140 | head -40; tail -3 $OUT/short/full.log
    echo "=== end $(date +%T)"
    ;;
esac

#!/usr/bin/env bash
# GPU calls of the third session:  bash benchmarks/run_final_c.sh A|B   (carry .devdeps; logs under $OUT)
#   A: GPU tests (incl. the generic projection on CUDA), generic vs fast projection speed (7B shape),
#      fp16 max error for every family, TBT while saving (7B, 1K), the Redis tier vs raw redis-py.
#   B: `hcache bench` for the 7B shape at 32K from DRAM; `hcache serve-bench --preset gpu-7b`.
#   D: the merged code, 7B and 8B at 1K/4K from DRAM, and the 7B/4K breakdown (see the end).
#   C: after the fixes B and A called for: fp16 errors of every family again (save() now passes generate()'s
#      position ids), TBT with room for its compile warm-up, 32K with two HCache instances (hcache, auto).
source benchmarks/device_env.sh
case "${1:-A}" in
  A)
    echo "=== tests $(date +%T)"
    timeout 170 python3 -m pytest -q -s -p no:cacheprovider tests/hcache/test_gpu.py tests/hcache/test_projection.py \
      tests/hcache/test_projection_generic.py -k "cuda or gpu or float16" > $OUT/gpu_tests.log 2>&1; tail -3 $OUT/gpu_tests.log
    echo "=== projection speed $(date +%T)"
    timeout 100 python3 benchmarks/projection_speed.py > $OUT/projection_speed.txt 2>&1; tail -8 $OUT/projection_speed.txt
    echo "=== fp16 errors $(date +%T)"
    timeout 170 python3 benchmarks/fp16_errors.py --families all --json $OUT/fp16_errors.json --out $OUT/fp16_errors.md \
      > $OUT/fp16_errors.log 2>&1; tail -3 $OUT/fp16_errors.log
    echo "=== TBT $(date +%T)"
    timeout 80 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024 --sources dram --methods hcache \
      --repeat 1 --warmup 1 --tbt-context 1024 --tbt-tokens 64 --tbt-pairs 4 --out $OUT/tbt > $OUT/tbt.log 2>&1; grep "TBT" $OUT/tbt.log
    echo "=== remote $(date +%T)"
    timeout 60 python3 benchmarks/remote_bench.py --total 128M --repeat 3 --out $OUT > $OUT/remote.log 2>&1; tail -12 $OUT/remote.log
    ;;
  B)
    echo "=== 32K $(date +%T)"
    mkdir -p $OUT/long
    timeout 230 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 32768 --sources dram \
      --long-methods recompute,ideal,kv,hcache,auto --long-repeat 3 --long-warmup 1 --out $OUT/long > $OUT/long/full.log 2>&1
    grep "^|\|###" $OUT/long/full.log | cut -c1-120 | head -30; tail -3 $OUT/long/full.log
    echo "=== serve $(date +%T)"
    mkdir -p $OUT/serve
    timeout 320 python3 -m hcache_adapter serve-bench --preset gpu-7b --time-limit-s 280 --no-progress --out $OUT/serve \
      > $OUT/serve/log 2>&1; tail -30 $OUT/serve/log
    ;;
  C)
    echo "=== fp16 errors $(date +%T)"
    timeout 170 python3 benchmarks/fp16_errors.py --families all --json $OUT/fp16_errors.json --out $OUT/fp16_errors.md \
      > $OUT/fp16_errors.log 2>&1; tail -2 $OUT/fp16_errors.log
    echo "=== 32K $(date +%T)"
    mkdir -p $OUT/long
    timeout 200 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 32768 --sources dram \
      --methods recompute,ideal,hcache,auto --long-repeat 3 --long-warmup 1 --out $OUT/long > $OUT/long/full.log 2>&1
    grep "^|\|###" $OUT/long/full.log | cut -c1-120 | head -30; tail -3 $OUT/long/full.log
    echo "=== TBT $(date +%T)"
    timeout 150 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024 --sources dram --methods hcache \
      --repeat 1 --warmup 1 --tbt-context 1024 --tbt-tokens 64 --tbt-pairs 4 --out $OUT/tbt > $OUT/tbt.log 2>&1; grep "TBT" $OUT/tbt.log; tail -3 $OUT/tbt.log
    ;;
esac
# D (appended): the code as merged, 7B and 8B at 1K/4K from DRAM (median of 9), and the 7B/4K breakdown.
if [ "${1:-}" = D ]; then
  echo "=== 1K/4K $(date +%T)"
  mkdir -p $OUT/short
  timeout 300 python3 -m hcache_adapter bench --no-progress --models llama2-7b,llama3-8b --contexts 1024,4096 --sources dram \
    --repeat 9 --warmup 3 --out $OUT/short > $OUT/short/full.log 2>&1
  grep "^|\|###" $OUT/short/full.log | cut -c1-130 | head -40; tail -2 $OUT/short/full.log
  echo "=== breakdown $(date +%T)"
  timeout 120 python3 benchmarks/ttft_breakdown.py --model llama2-7b --context 4096 > $OUT/breakdown_7b_4k.txt 2>&1
  head -45 $OUT/breakdown_7b_4k.txt
fi
# E (appended): D's 7B rows again with the store flushed before measuring (D ran with the flusher busy).
if [ "${1:-}" = E ]; then
  mkdir -p $OUT/short
  timeout 165 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024,4096 --sources dram \
    --methods recompute,ideal,kv,hcache,auto --repeat 7 --warmup 2 --out $OUT/short > $OUT/short/full.log 2>&1
  grep "^|\|###" $OUT/short/full.log | cut -c1-130 | head -24; tail -2 $OUT/short/full.log
fi

#!/usr/bin/env bash
# GPU calls of the fourth session:  bash benchmarks/run_final_d.sh F|G   (carry .devdeps; logs under $OUT)
#   F: the GPU tests (segmented captured prefill, restores into its static cache), then the TTFT timeline of
#      one 7B/4K request per method (benchmarks/ttft_timeline.py).
#   G: `hcache bench`, 7B and 8B at 1K/4K from DRAM (every method), then the 7B at 16K.
#   H: `hcache bench` 7B/4K twice: as is, then with Python's cyclic garbage collector off for the whole process
#      (run before the bench froze its heap after warm-up).
source benchmarks/device_env.sh
case "${1:-F}" in
  F)
    echo "=== tests $(date +%T)"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/hcache/test_gpu.py > $OUT/gpu_tests.log 2>&1
    tail -1 $OUT/gpu_tests.log; grep -i "error\|failed" $OUT/gpu_tests.log | head -5
    echo "=== timeline $(date +%T)"
    timeout 200 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 4096 --methods recompute,ideal,hcache,kv \
      --repeat 7 > $OUT/ttft_timeline_7b_4k.md 2>&1; grep -v "Warn\|warn" $OUT/ttft_timeline_7b_4k.md | head -70
    ;;
  G)
    bench_dram 330 200
    ;;
  H)
    A="bench --no-progress --models llama2-7b --contexts 4096 --sources dram --methods recompute,ideal,kv,hcache,auto --repeat 7 --warmup 2"
    mkdir -p $OUT/a $OUT/b
    timeout 140 python3 -m hcache_adapter $A --out $OUT/a > $OUT/a/log 2>&1; grep "^| [a-z]" $OUT/a/log | cut -c1-90
    timeout 140 python3 -c "import gc,sys,runpy; gc.disable(); sys.argv=['hcache']+sys.argv[1:]; runpy.run_module('hcache_adapter', run_name='__main__')" \
      $A --out $OUT/b > $OUT/b/log 2>&1; grep "^| [a-z]" $OUT/b/log | cut -c1-90
    ;;
esac

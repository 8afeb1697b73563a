#!/usr/bin/env bash
# GPU calls of the eighth session, in the order run:  bash benchmarks/run_final_h.sh A|B
#   (carry .devdeps; logs under $OUT). The variants are ttft_timeline.py's.
#   A: GPU tests of the restores (the reads started before the lookup finished among them); 7B timelines at 16K
#      and 4K of the default (reads started early) against early=0, and at 16K of 1-layer forward segments
#      (seg=1); TBT while saving with the bench's NVMe tier and without one (is the flusher what costs?).
#      (The TBT calls timed out at 100 s each, printing nothing: the first hc.generate compiles the prefill's blocks.)
#   B: (the early loader builds only the keys of the layers it queues, and is extended with the rest) GPU tests of
#      the restores; 7B timelines at 16K and 4K against early=0.
#   C: `hcache bench` with the early start (the session's later commits did not run on the GPU): both shapes at 1K/4K (every method, median of 7), then 7B/16K (median of 5).
source benchmarks/device_env.sh

case "${1:-A}" in
  A)
    gpu_tests 170 tests/hstore/test_lease.py tests/hcache/test_gpu.py \
      -k "lease or matches_prefill or modes or captured or restore_into or issued_ahead or starting_with_kv or before_the_lookup"
    timeline 200 16384 4 14 ideal,hcache,hcache/early=0,hcache/seg=1 --dram-gib 40
    grep "restore returned\|early start\|layers located\|copies done" $OUT/ttft_timeline_7b_16k.md | head -12
    timeline 110 4096 7 12 ideal,hcache,hcache/early=0
    grep "restore returned\|early start\|layers located\|copies done" $OUT/ttft_timeline_7b_4k.md | head -12
    for nv in 24 0; do
      echo "=== tbt nvme=${nv} $(date +%T)"
      timeout 100 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024 --sources dram \
        --methods recompute --repeat 1 --warmup 0 --tbt-context 1024 --tbt-tokens 64 --tbt-pairs 8 --nvme-gib $nv \
        --out $OUT/tbt$nv > $OUT/tbt_nvme$nv.log 2>&1
      grep "TBT" $OUT/tbt_nvme$nv.log | tail -1
    done
    echo "=== end $(date +%T)"
    ;;
  B)
    gpu_tests 120 tests/hcache/test_gpu.py -k "matches_prefill or modes or restore_into or issued_ahead or before_the_lookup"
    timeline 130 16384 4 14 ideal,hcache,hcache/early=0 --dram-gib 40
    grep "restore returned\|early start\|layers located\|copies done" $OUT/ttft_timeline_7b_16k.md | head -12
    timeline 80 4096 5 12 ideal,hcache,hcache/early=0
    echo "=== end $(date +%T)"
    ;;
  C)
    BENCH_LONG_REPEAT=5 bench_dram 320 240
    ;;
esac

#!/usr/bin/env bash
# GPU calls of the seventh session, in the order run:  bash benchmarks/run_final_g.sh A|B|...
#   (carry .devdeps; logs under $OUT). Each stage ran the code as it was then; the variants are ttft_timeline.py's.
#   A: the CUDA lease tests; `hcache bench` at 7B/16K as the sixth session ran it (every stored method's instance
#      made, an NVMe tier), now counting CUDA allocator retries per row; then timelines at 16K and 4K of the default
#      (every free slot's copies first) against 3 layers ahead (look=3) with the lease windows.
#   B: (3 layers ahead the default; chunk keys built as bytes; digests from one conversion of the tokens) GPU tests of
#      the restores, leases and captured prefill; a 7B/4K timeline of the forward's segment size (seg=1/2, default 4)
#      and of plans whose last 2 or 4 layers are saved as K/V (fewer projections, more bytes copied).
#   C: a 7B/4K timeline of the projection GEMMs leaving SMs free for the forward beside them (carve=24/48), the
#      forward replayed on the current stream (prio=0), and carve=24 with a K/V tail of 4 layers.
#   D: `hcache bench` of the final code: both shapes at 1K/4K (every method, median of 7), then 7B/16K (median of 5).
#      Its 16K call had one warm-up round (device_env.sh then), so the prefill's capture landed in a timed round.
#   E: 7B/16K again with 2 warm-up rounds (median of 5), then a 16K timeline of the final code.
#   F: the 16K timeline in the bench's conditions: an NVMe tier (24 GiB) and a second method's state saved (kv).
source benchmarks/device_env.sh

case "${1:-A}" in
  A)
    gpu_tests 90 tests/hstore/test_lease.py -k "cuda or lease"
    echo "=== bench 16K $(date +%T)"
    mkdir -p $OUT/long
    timeout 230 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 16384 --sources dram \
      --long-methods recompute,ideal,hcache,auto --long-repeat 5 --long-warmup 2 --out $OUT/long > $OUT/long/full.log 2>&1
    grep "^|\|###" $OUT/long/full.log | cut -c1-160 | head -14; tail -2 $OUT/long/full.log
    timeline 130 16384 3 12 ideal,hcache,hcache/look=3 --dram-gib 40
    grep "alloc\|restore call\|lookup" $OUT/ttft_timeline_7b_16k.md | head -12
    timeline 110 4096 7 12 ideal,hcache,hcache/look=3
    echo "=== end $(date +%T)"
    ;;
  B)
    gpu_tests 150 tests/hstore/test_lease.py tests/hcache/test_gpu.py \
      -k "lease or matches_prefill or modes or captured or restore_into or issued_ahead or starting_with_kv"
    timeline 230 4096 7 12 ideal,hcache,hcache/seg=1,hcache/seg=2,mix/kv=2/at=end,mix/kv=4/at=end
    echo "=== end $(date +%T)"
    ;;
  C)
    timeline 200 4096 7 12 ideal,hcache,hcache/carve=24,hcache/carve=48,hcache/prio=0,mix/kv=4/at=end/carve=24
    echo "=== end $(date +%T)"
    ;;
  D)
    BENCH_LONG_REPEAT=5 bench_dram 320 240
    ;;
  E)
    echo "=== 16K $(date +%T)"
    mkdir -p $OUT/long
    timeout 230 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 16384 --sources dram \
      --long-methods recompute,ideal,hcache,auto --long-repeat 5 --long-warmup 2 --out $OUT/long > $OUT/long/full.log 2>&1
    grep "^|\|###" $OUT/long/full.log | cut -c1-160 | head -14; tail -2 $OUT/long/full.log
    timeline 110 16384 3 12 ideal,hcache --dram-gib 40
    echo "=== end $(date +%T)"
    ;;
  F)
    timeline 150 16384 3 12 ideal,hcache,kv --dram-gib 40 --nvme-gib 24
    grep -A8 "### hcache" $OUT/ttft_timeline_7b_16k.md
    echo "=== end $(date +%T)"
    ;;
esac

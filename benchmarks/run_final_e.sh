#!/usr/bin/env bash
# GPU calls of the fifth session:  bash benchmarks/run_final_e.sh I|J|K   (carry .devdeps; logs under $OUT)
#   I: GPU tests of the captured prefill, then TTFT timelines (benchmarks/ttft_timeline.py) of one 7B request
#      at 4K and at 16K: the segments replayed on a high-priority stream or not, shorter segments, and plans
#      saving the first k layers as K/V ("mix/kv=k"); then the first forward's top kernels.
#   J: the same tests and the new ones (restores queued ahead of the layer the model takes, plans that start with
#      K/V layers), then timelines at 4K and 16K: the whole restore queued before generate() ("ahead=all", as
#      before) or `issue_ahead_bytes` of it (the default, and other budgets), and plans whose last k layers are K/V.
#   K: the GPU tests, then timelines at 4K and 16K with the layers' norms, MLPs and rotary compiled into the
#      captured prefill or not ("fuse=0"), the restore queued ahead or all at once, one tail-K/V plan.
#   L: timelines at 4K and 16K with the projection graphs' GEMMs leaving SMs free for the forward ("carve=N").
#   M: `hcache bench` with this session's defaults: 7B and 8B at 1K/4K from DRAM (every method), the 7B at 16K.
#   N: the GPU tests (test_gpu.py and the projections on CUDA), then the timeline of 7B/4K with the final code.
source benchmarks/device_env.sh
case "${1:-I}" in
  I)
    echo "=== tests $(date +%T)"
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/hcache/test_gpu.py -k "segmented or restore_into or captured_prefill" \
      > $OUT/gpu_tests.log 2>&1; tail -1 $OUT/gpu_tests.log; grep -i "error\|failed" $OUT/gpu_tests.log | head -5
    echo "=== timeline 4K $(date +%T)"
    timeout 200 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 4096 --repeat 7 \
      --methods recompute,ideal,hcache,hcache/prio=0,hcache/seg=2,mix/kv=4,mix/kv=8 > $OUT/ttft_timeline_7b_4k.md 2>&1
    grep -v "Warn\|warn" $OUT/ttft_timeline_7b_4k.md | head -12
    echo "=== timeline 16K $(date +%T)"
    timeout 190 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 16384 --repeat 3 --dram-gib 40 \
      --methods recompute,ideal,hcache,hcache/prio=0,mix/kv=4 > $OUT/ttft_timeline_7b_16k.md 2>&1
    grep -v "Warn\|warn" $OUT/ttft_timeline_7b_16k.md | head -10
    echo "=== kernels $(date +%T)"
    timeout 80 python3 benchmarks/prefill_kernels.py --model llama2-7b --context 4096 --top 16 > $OUT/prefill_kernels_7b_4k.txt 2>&1
    grep -v "Warn\|warn" $OUT/prefill_kernels_7b_4k.txt | head -40
    ;;
  J)
    echo "=== tests $(date +%T)"
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/hcache/test_gpu.py \
      -k "segmented or restore_into or captured_prefill or issued_ahead or starting_with_kv or matches_prefill" \
      > $OUT/gpu_tests.log 2>&1; tail -1 $OUT/gpu_tests.log; grep -i "error\|failed" $OUT/gpu_tests.log | head -5
    echo "=== timeline 4K $(date +%T)"
    timeout 220 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 4096 --repeat 7 \
      --methods recompute,ideal,hcache/ahead=all,hcache,hcache/ahead=192,hcache/ahead=1024,mix/kv=4/at=end,mix/kv=8/at=end,mix/kv=4 \
      > $OUT/ttft_timeline_7b_4k.md 2>&1
    grep -v "Warn\|warn" $OUT/ttft_timeline_7b_4k.md | head -14
    echo "=== timeline 16K $(date +%T)"
    timeout 200 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 16384 --repeat 3 --dram-gib 40 \
      --methods recompute,ideal,hcache/ahead=all,hcache,mix/kv=2/at=end,mix/kv=4/at=end > $OUT/ttft_timeline_7b_16k.md 2>&1
    grep -v "Warn\|warn" $OUT/ttft_timeline_7b_16k.md | head -11
    ;;
  K)
    echo "=== tests $(date +%T)"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/hcache/test_gpu.py \
      -k "segmented or restore_into or captured_prefill or issued_ahead or starting_with_kv or generation_modes or modes" \
      > $OUT/gpu_tests.log 2>&1; tail -1 $OUT/gpu_tests.log; grep -i "error\|failed\|max abs" $OUT/gpu_tests.log | head -5
    echo "=== timeline 4K $(date +%T)"
    timeout 200 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 4096 --repeat 7 \
      --methods recompute,ideal,hcache,hcache/fuse=0,hcache/ahead=all,mix/kv=6/at=end > $OUT/ttft_timeline_7b_4k.md 2>&1
    grep -v "Warn\|warn" $OUT/ttft_timeline_7b_4k.md | head -11
    echo "=== timeline 16K $(date +%T)"
    timeout 170 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 16384 --repeat 3 --dram-gib 24 \
      --methods recompute,ideal,hcache,hcache/ahead=all > $OUT/ttft_timeline_7b_16k.md 2>&1
    grep -v "Warn\|warn" $OUT/ttft_timeline_7b_16k.md | head -9
    ;;
  L)
    echo "=== timeline 4K $(date +%T)"
    timeout 170 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 4096 --repeat 7 \
      --methods recompute,ideal,hcache,hcache/carve=16,hcache/carve=40,mix/kv=6/at=end > $OUT/ttft_timeline_7b_4k.md 2>&1
    grep -v "Warn\|warn" $OUT/ttft_timeline_7b_4k.md | head -11
    echo "=== timeline 16K $(date +%T)"
    timeout 150 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 16384 --repeat 3 --dram-gib 24 \
      --methods recompute,ideal,hcache,hcache/carve=16 > $OUT/ttft_timeline_7b_16k.md 2>&1
    grep -v "Warn\|warn" $OUT/ttft_timeline_7b_16k.md | head -9
    ;;
  M)
    echo "=== 1K/4K $(date +%T)"
    mkdir -p $OUT/short $OUT/long
    timeout 370 python3 -m hcache_adapter bench --no-progress --models llama2-7b,llama3-8b --contexts 1024,4096 \
      --sources dram --methods recompute,ideal,hf_offloaded,kv,hcache,auto --repeat 7 --warmup 2 --out $OUT/short > $OUT/short/full.log 2>&1
    grep "^|\|###" $OUT/short/full.log | cut -c1-120 | head -50; tail -2 $OUT/short/full.log
    echo "=== 16K $(date +%T)"
    timeout 170 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 16384 --sources dram \
      --long-methods recompute,ideal,hcache,auto --long-repeat 3 --long-warmup 1 --out $OUT/long > $OUT/long/full.log 2>&1
    grep "^|\|###" $OUT/long/full.log | cut -c1-120 | head -14; tail -2 $OUT/long/full.log; echo "=== end $(date +%T)"
    ;;
  N)
    echo "=== tests $(date +%T)"
    timeout 175 python3 -m pytest -q -p no:cacheprovider tests/hcache/test_gpu.py tests/hcache/test_projection.py \
      tests/hcache/test_projection_generic.py -k "cuda or gpu or float16" > $OUT/gpu_tests.log 2>&1; tail -1 $OUT/gpu_tests.log; grep -i "error\|failed" $OUT/gpu_tests.log | head -8
    echo "=== timeline 4K $(date +%T)"
    timeout 95 python3 benchmarks/ttft_timeline.py --model llama2-7b --context 4096 --repeat 7 \
      --methods recompute,ideal,hcache,kv > $OUT/ttft_timeline_7b_4k.md 2>&1
    grep -v "Warn\|warn" $OUT/ttft_timeline_7b_4k.md | head -10; echo "=== end $(date +%T)"
    ;;
esac

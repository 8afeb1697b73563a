#!/usr/bin/env bash
# GPU calls of the fifth session:  bash benchmarks/run_final_e.sh I|J|K|L|M|N   (carry .devdeps; logs under $OUT)
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

PREFILL_TESTS="segmented or restore_into or captured_prefill"
case "${1:-I}" in
  I)
    gpu_tests 100 tests/hcache/test_gpu.py -k "$PREFILL_TESTS"
    timeline 200 4096 7 12 recompute,ideal,hcache,hcache/prio=0,hcache/seg=2,mix/kv=4,mix/kv=8
    timeline 190 16384 3 10 recompute,ideal,hcache,hcache/prio=0,mix/kv=4 --dram-gib 40
    echo "=== kernels $(date +%T)"
    timeout 80 python3 benchmarks/prefill_kernels.py --model llama2-7b --context 4096 --top 16 > $OUT/prefill_kernels_7b_4k.txt 2>&1
    grep -v "Warn\|warn" $OUT/prefill_kernels_7b_4k.txt | head -40
    ;;
  J)
    gpu_tests 100 tests/hcache/test_gpu.py -k "$PREFILL_TESTS or issued_ahead or starting_with_kv or matches_prefill"
    timeline 220 4096 7 14 \
      recompute,ideal,hcache/ahead=all,hcache,hcache/ahead=192,hcache/ahead=1024,mix/kv=4/at=end,mix/kv=8/at=end,mix/kv=4
    timeline 200 16384 3 11 recompute,ideal,hcache/ahead=all,hcache,mix/kv=2/at=end,mix/kv=4/at=end --dram-gib 40
    ;;
  K)
    gpu_tests 150 tests/hcache/test_gpu.py \
      -k "$PREFILL_TESTS or issued_ahead or starting_with_kv or generation_modes or modes"
    timeline 200 4096 7 11 recompute,ideal,hcache,hcache/fuse=0,hcache/ahead=all,mix/kv=6/at=end
    timeline 170 16384 3 9 recompute,ideal,hcache,hcache/ahead=all --dram-gib 24
    ;;
  L)
    timeline 170 4096 7 11 recompute,ideal,hcache,hcache/carve=16,hcache/carve=40,mix/kv=6/at=end
    timeline 150 16384 3 9 recompute,ideal,hcache,hcache/carve=16 --dram-gib 24
    ;;
  M)
    bench_dram 370 170
    ;;
  N)
    gpu_tests 175 tests/hcache/test_gpu.py tests/hcache/test_projection.py tests/hcache/test_projection_generic.py \
      -k "cuda or gpu or float16"
    timeline 95 4096 7 10 recompute,ideal,hcache,kv
    echo "=== end $(date +%T)"
    ;;
esac

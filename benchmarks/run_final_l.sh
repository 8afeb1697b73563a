#!/usr/bin/env bash
# GPU calls of the twelfth session, in the order run:  bash benchmarks/run_final_l.sh A|B|...
#   (carry .devdeps; logs under $OUT). The variants are ttft_timeline.py's.
#   A: flash_decoding's Triton kernels for the captured prefill's attention: their GPU time and error against
#      the fused kernel's pieces (attention_kernels.py), the GPU tests, and the 7B/4K timeline with them
#      against without (attn=pieces), auto, and the last layers saved as K/V (mix/kv=N/at=end).
#   B: the kernels' tiling swept (block of keys, warps, stages, thread blocks) at the 4K bucket with its real
#      padding; the 7B/4K timeline with them: queuing part of the restore before generate() (ahead=MiB), auto,
#      two last layers as K/V; the 7B/16K timeline (median of 3).
#   C: with the tuned tiling and 256 MiB queued ahead the defaults: the GPU tests; the 7B/4K timeline against
#      all of the restore queued at once (ahead=all), the fused kernel's pieces, auto, two last layers as K/V;
#      the 7B/16K timeline, 256 MiB against all queued at once (median of 3).
#   D: the full bench (both shapes 1K/4K, the 7B at 16K).
#   E: the budget queued ahead now measured (`IssueAhead`: copies for 1.5x generate()'s measured set-up): the
#      GPU tests of restores; the 7B/4K timeline against 256 MiB and all of it.
source benchmarks/device_env.sh

case "${1:-A}" in
  A)
    echo "=== attention kernels $(date +%T)"
    timeout 80 python3 benchmarks/attention_kernels.py --rows 1280,5120,20480 --splits 8 --replays 10 \
      > $OUT/attention_kernels.md 2>&1
    grep -v "Warn\|warn" $OUT/attention_kernels.md | head -24
    gpu_tests 150 tests/hcache/test_flash_decoding.py tests/hcache/test_split_attention.py tests/hcache/test_gpu.py
    timeline 240 4096 9 9 ideal,recompute,hcache/attn=pieces,hcache,auto,mix/kv=2/at=end,mix/kv=4/at=end
    grep "TTFT\|restore compute done\|restore copies done\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -28
    echo "=== end $(date +%T)"
    ;;
  B)
    echo "=== attention sweep $(date +%T)"
    timeout 90 python3 benchmarks/attention_kernels.py --rows 5120 --padding 928 --splits 8 --replays 10 \
      --triton-configs 64:4:2:264,64:4:4:264,128:4:3:264,128:8:3:264,64:4:3:528,32:4:3:528,64:8:3:264,128:8:4:528 \
      > $OUT/attention_sweep.md 2>&1
    grep -v "Warn\|warn" $OUT/attention_sweep.md | head -30
    timeline 200 4096 9 10 ideal,recompute,hcache,hcache/ahead=256,hcache/ahead=512,hcache/ahead=1024,auto,mix/kv=2/at=end
    grep "TTFT\|restore returned\|restore compute done\|restore copies done\|prefill replay start\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -56
    timeline 150 16384 3 8 hcache,auto --dram-gib 40
    grep "TTFT\|restore compute done\|prefill replay end" $OUT/ttft_timeline_7b_16k.md | head -8
    echo "=== end $(date +%T)"
    ;;
  C)
    gpu_tests 170 tests/hcache/test_flash_decoding.py tests/hcache/test_split_attention.py \
      tests/hcache/test_restore_ahead.py tests/hcache/test_capture_streams.py tests/hcache/test_gpu.py
    timeline 200 4096 9 10 ideal,recompute,hcache,hcache/ahead=all,hcache/attn=pieces,auto,mix/kv=2/at=end
    grep "TTFT\|restore returned\|restore compute done\|restore copies done\|prefill replay start\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -50
    timeline 150 16384 3 8 hcache,hcache/ahead=all --dram-gib 40
    grep "TTFT\|restore compute done\|prefill replay end" $OUT/ttft_timeline_7b_16k.md | head -8
    echo "=== end $(date +%T)"
    ;;
  D)
    BENCH_LONG_REPEAT=3 bench_dram 330 200
    ;;
  E)
    gpu_tests 150 tests/hcache/test_restore_ahead.py tests/hcache/test_gpu.py
    timeline 150 4096 9 10 ideal,recompute,hcache,hcache/ahead=256,hcache/ahead=all,auto
    grep "TTFT\|restore returned\|restore compute done\|restore copies done\|prefill replay start\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -40
    echo "=== end $(date +%T)"
    ;;
esac

#!/usr/bin/env bash
# GPU calls of the twelfth session, in the order run:  bash benchmarks/run_final_l.sh A|B|...
#   (carry .devdeps; logs under $OUT). The variants are ttft_timeline.py's.
#   A: flash_decoding's Triton kernels for the captured prefill's attention: their GPU time and error against
#      the fused kernel's pieces (attention_kernels.py), the GPU tests, and the 7B/4K timeline with them
#      against without (attn=pieces), auto, and the last layers saved as K/V (mix/kv=N/at=end).
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
esac

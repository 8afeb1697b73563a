#!/usr/bin/env bash
# GPU calls of the fifteenth session, in the order run:  bash benchmarks/run_final_o.sh A|...
#   (carry .devdeps; logs under $OUT).
#   A: where a split restore from NVMe loses its 15-40 ms (`nvme_timeline.py`: host stamps, GPU marks, and the
#      host's waits for the device under sync debug mode), 7B at 4K and 16K, beside recompute and auto.
#   B: after auto's restore timing moved off the host (events read at its next decision: no wait for the device
#      inside the first forward), manifests cached, the NVMe readers started once layer 0's recomputation is
#      issued, and a prefix wholly on NVMe guessed from its last layer once auto learned that loading loses:
#      the GPU tests; the NVMe timelines again; auto from NVMe (`nvme_split.py`, no forced split) at 4K and 16K.
#   C: auto judging its split restores by the time to first token against measured prefills of that length
#      (B: at 16K it split and won 1.10x forced, but its estimate of recomputing everything was low, so it
#      counted its wins as losses): the timer's GPU test, then auto from NVMe at 4K and 16K again.
source benchmarks/device_env.sh

# nvme_auto CONTEXT...: auto from NVMe (`nvme_split.py`, no forced split, 9 rounds after 2) into $OUT/nvme_auto_<K>k.md
nvme_auto() {
  for n in "$@"; do
    echo "=== nvme auto $((n / 1024))K $(date +%T)"
    timeout 200 python3 benchmarks/nvme_split.py --model llama2-7b --contexts $n --splits none --repeat 9 --warmup 2 \
      > $OUT/nvme_auto_$((n / 1024))k.md 2>&1
    grep "^|\|###\|profile\|Error" $OUT/nvme_auto_$((n / 1024))k.md
  done
}

case "${1:-A}" in
  A)
    echo "=== nvme timeline 4K $(date +%T)"
    timeout 200 python3 benchmarks/nvme_timeline.py --model llama2-7b --context 4096 --splits 28,30 --repeat 5 \
      > $OUT/nvme_timeline_4k.md 2>&1
    grep -v "Warn\|warn\|^ *$\|nanobind\|leaked" $OUT/nvme_timeline_4k.md | head -120
    echo "=== nvme timeline 16K $(date +%T)"
    timeout 250 python3 benchmarks/nvme_timeline.py --model llama2-7b --context 16384 --splits 28 --repeat 3 \
      > $OUT/nvme_timeline_16k.md 2>&1
    grep -v "Warn\|warn\|^ *$\|nanobind\|leaked" $OUT/nvme_timeline_16k.md | head -90
    echo "=== end $(date +%T)"
    ;;
  B)
    gpu_tests 200 tests/hcache/test_gpu.py tests/hcache/test_restore_ahead.py tests/hcache/test_first_layer_embedding.py \
      tests/hcache/test_restore_timer.py tests/hcache/test_recompute_start.py
    for n in 4096 16384; do
      echo "=== nvme timeline $((n / 1024))K $(date +%T)"
      timeout 200 python3 benchmarks/nvme_timeline.py --model llama2-7b --context $n --splits 27,28 --repeat 3 \
        > $OUT/nvme_timeline_$((n / 1024))k.md 2>&1
      grep "^| \(recompute\|auto\|r=\)\|^###\|recompute queued\|read done\|first forward start\|generate ret\|recompute start\|learned" \
        $OUT/nvme_timeline_$((n / 1024))k.md | head -40
    done
    nvme_auto 4096 16384
    echo "=== end $(date +%T)"
    ;;
  C)
    gpu_tests 60 tests/hcache/test_restore_timer.py
    nvme_auto 16384 4096
    echo "=== end $(date +%T)"
    ;;
esac

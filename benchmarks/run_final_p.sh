#!/usr/bin/env bash
# GPU calls of the sixteenth session, in the order run:  bash benchmarks/run_final_p.sh A|B
#   (carry .devdeps; logs under $OUT).
#   A: auto from NVMe planning its splits with recomputation scaled to the prefills it measured of that length,
#      and not learning from a request that allocated its restore's buffers (pinned staging is now kept in the
#      ring, allocated once): the GPU tests of the loader, the timer and the restore; then `nvme_split.py` with
#      auto beside recompute and the fifteenth session's best forced split (r=27 at 16K, r=28 at 4K), more
#      rounds, auto's timed requests printed.
#   A2: after A (at 4K auto judged its splits against 32 x a layer of its own recomputation, which beside the
#      readers ran 15% slower than the model's prefill, so it kept losing splits): a length with splits but no
#      measured prefill leaves one request to the prefill to measure it. `nvme_split.py` at 4K and 16K again.
#   B: the full `hcache bench` from DRAM on this session's code (both shapes 1K/4K, the 7B at 16K).
source benchmarks/device_env.sh

# nvme_vs CONTEXT SPLIT REPEAT SECONDS: recompute, auto and one forced split from NVMe into $OUT/nvme_auto_<K>k.md
nvme_vs() {
  local n=$1 split=$2 repeat=$3 t=$4
  echo "=== nvme auto vs r=$split $((n / 1024))K $(date +%T)"
  timeout "$t" python3 benchmarks/nvme_split.py --model llama2-7b --contexts $n --splits $split --repeat $repeat \
    --warmup 2 > $OUT/nvme_auto_$((n / 1024))k.md 2>&1
  grep -v "leaked\|nanobind\|skipped remainder\|refleaks\|Warn\|warn\|^ *$" $OUT/nvme_auto_$((n / 1024))k.md | head -40
}

case "${1:-A}" in
  A)
    gpu_tests 220 tests/hcache/test_loader.py tests/hcache/test_restore_timer.py tests/hcache/test_gpu.py \
      tests/hcache/test_restore_ahead.py tests/hcache/test_first_layer_embedding.py tests/hcache/test_recompute_start.py
    nvme_vs 16384 27 20 330
    nvme_vs 4096 28 15 150
    echo "=== end $(date +%T)"
    ;;
  A2)
    nvme_vs 4096 28 15 150
    nvme_vs 16384 27 15 260
    echo "=== end $(date +%T)"
    ;;
  B)
    BENCH_LONG_REPEAT=5 bench_dram 330 220
    ;;
esac

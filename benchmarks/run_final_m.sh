#!/usr/bin/env bash
# GPU calls of the thirteenth session, in the order run:  bash benchmarks/run_final_m.sh F|...
#   (carry .devdeps; logs under $OUT). The variants are ttft_timeline.py's.
#   F: a length's graphs all captured by its second call (the projection graphs into the captured prefill's
#      static cache on the destination's first use), and one layer queued ahead when the host queues a layer
#      slower than the copy engine moves it (`IssueAhead.host_bound`): the GPU tests of both; the 7B/1K
#      timeline (the default against one layer ahead and everything ahead); `hcache bench` of the 7B at
#      1K/4K, each round's samples showing whether a timed round still captures.
#   (E of run_final_l.sh ran first: the GPU tests with the measured budget, the 7B/4K timeline.)
#   G: the full bench on this session's code (both shapes 1K/4K, the 7B at 16K).
#   H: every GPU test of the restore and the captured prefill; saving while decoding (TBT, 7B at 1K, 64 new
#      tokens, 9 paired rounds); the 7B/4K timeline (auto, and the last two layers saved as K/V); `hcache bench`
#      of the 7B at 4K from NVMe (the ~2 GB/s virtual disk; median of 3 after 1 warm-up).
#   I: projection graphs that read the loaded hidden state in place (no copy into their input, lengths without
#      padding rows): every GPU test; the 7B/4K timeline against copying it in (readslot=0); `hcache bench` of
#      the 7B at 1K/4K.
source benchmarks/device_env.sh

# bench_7b SECONDS: `hcache bench` of the 7B at 1K/4K from DRAM (every method but hf_offloaded, median of 7) into
# $OUT/bench; its tables to stdout.
bench_7b() {
  echo "=== bench 7B 1K/4K $(date +%T)"
  mkdir -p $OUT/bench
  timeout "$1" python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024,4096 --sources dram \
    --methods recompute,ideal,kv,hcache,auto --repeat 7 --warmup 2 --out $OUT/bench > $OUT/bench/full.log 2>&1
  grep "^|\|###\|paired" $OUT/bench/full.log | cut -c1-110 | head -30
}

case "${1:-F}" in
  F)
    gpu_tests 150 tests/hcache/test_restore_ahead.py tests/hcache/test_gpu.py \
      -k "every_capture or ahead or static_cache or segmented or greedy or plans_starting"
    timeline 120 1024 9 9 ideal,recompute,kv,hcache,hcache/ahead=0,hcache/ahead=all,auto
    grep "TTFT\|restore returned\|first forward start\|restore compute done\|restore copies done\|prefill replay start\|prefill replay end" $OUT/ttft_timeline_7b_1k.md | head -60
    bench_7b 200
    awk -F, '{print $2, $4, $5, $NF}' $OUT/bench/ttft.csv
    echo "=== end $(date +%T)"
    ;;
  G)
    BENCH_LONG_REPEAT=3 bench_dram 330 200
    ;;
  H)
    gpu_tests 200 tests/hcache/test_gpu.py tests/hcache/test_restore_ahead.py tests/hcache/test_flash_decoding.py \
      tests/hcache/test_split_attention.py tests/hcache/test_capture_streams.py tests/hstore/test_lease.py
    echo "=== tbt $(date +%T)"
    timeout 150 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024 --sources dram \
      --methods recompute --repeat 1 --warmup 0 --tbt-context 1024 --tbt-tokens 64 --tbt-pairs 9 --nvme-gib 24 \
      --out $OUT/tbt > $OUT/tbt.log 2>&1
    grep "TBT" $OUT/tbt.log | tail -1
    timeline 150 4096 9 8 ideal,recompute,hcache,auto,mix/kv=2/at=end
    grep "TTFT\|restore returned\|restore compute done\|restore copies done\|prefill replay start\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -40
    echo "=== nvme 7B 4K $(date +%T)"
    mkdir -p $OUT/nvme
    timeout 150 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 4096 --sources nvme \
      --nvme-contexts 4096 --methods recompute,hcache,auto --nvme-methods recompute,hcache,auto --long-repeat 3 \
      --long-warmup 1 --dram-gib 8 --nvme-gib 12 --out $OUT/nvme > $OUT/nvme/full.log 2>&1
    grep "^|\|###\|paired" $OUT/nvme/full.log | cut -c1-120 | head -12; tail -2 $OUT/nvme/full.log
    echo "=== end $(date +%T)"
    ;;
  I)
    gpu_tests 170 tests/hcache/test_gpu.py tests/hcache/test_restore_ahead.py
    timeline 120 4096 9 7 ideal,recompute,hcache,hcache/readslot=0,auto
    grep "TTFT\|restore compute done\|restore copies done\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -24
    bench_7b 150
    echo "=== end $(date +%T)"
    ;;
esac

#!/usr/bin/env bash
# GPU calls of the fourteenth session, in the order run:  bash benchmarks/run_final_n.sh A|B
#   (carry .devdeps; logs under $OUT). The variants are ttft_timeline.py's.
#   A: layer 0 projected from the token embedding instead of copied (`Restorer.embeds_first`): the GPU tests of
#      the restore and of the embedded layer 0; the 7B/4K timeline; `hcache bench` of the 7B at 1K/4K; the raw
#      virtual disk (O_DIRECT sequential reads next to the store's NVMe tier) for the NVMe target.
#   B: the full bench on this session's code (both shapes 1K/4K, the 7B at 16K).
#   C: does a process that served restores run eager forwards slower (`host_drift.py`: the bench's "ideal" row
#      has read ~40 ms where the timeline, minutes before on the same lease, read ~29)? Then TTFT from NVMe
#      against the recomputed layers forced (`nvme_split.py`, 7B at 4K and 16K) beside recompute and auto.
#   D: auto from NVMe after it learns from the median of its last split restores (calls that captured graphs not
#      counted) and tries the profile's split again every 16th restore it recomputes: `nvme_split.py` with no
#      forced split, 7B at 4K and 16K, more rounds.
source benchmarks/device_env.sh

# bench_7b SECONDS REPEAT: `hcache bench` of the 7B at 1K/4K from DRAM (every method but hf_offloaded) into
# $OUT/bench; its tables to stdout.
bench_7b() {
  echo "=== bench 7B 1K/4K $(date +%T)"
  mkdir -p $OUT/bench
  timeout "$1" python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024,4096 --sources dram \
    --methods recompute,ideal,kv,hcache,auto --repeat "$2" --warmup 2 --out $OUT/bench > $OUT/bench/full.log 2>&1
  grep "^|\|###\|paired" $OUT/bench/full.log | cut -c1-110 | head -30
}

case "${1:-A}" in
  A)
    gpu_tests 170 tests/hcache/test_gpu.py tests/hcache/test_restore_ahead.py tests/hcache/test_first_layer_embedding.py
    timeline 110 4096 9 7 ideal,recompute,hcache,auto
    grep "TTFT\|restore compute done\|restore copies done\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -24
    bench_7b 170 9
    echo "=== disk $(date +%T)"
    timeout 60 python3 -m hstore.cli bench /tmp/hb --tiers nvme --sizes 512K,2M,8M --total 1G --repeat 2 --no-progress \
      --csv $OUT/disk.csv > $OUT/disk.log 2>&1
    tail -12 $OUT/disk.log
    echo "=== end $(date +%T)"
    ;;
  B)
    BENCH_LONG_REPEAT=3 bench_dram 330 200
    ;;
  C)
    echo "=== drift $(date +%T)"
    timeout 150 python3 benchmarks/host_drift.py --model llama2-7b > $OUT/host_drift.md 2>&1
    grep "^|\|hc.gen\|Error" $OUT/host_drift.md
    echo "=== nvme split 4K $(date +%T)"
    timeout 150 python3 benchmarks/nvme_split.py --model llama2-7b --contexts 4096 --splits 25-30 --repeat 5 \
      > $OUT/nvme_split_4k.md 2>&1
    grep "^|\|###\|profile\|Error" $OUT/nvme_split_4k.md
    echo "=== nvme split 16K $(date +%T)"
    timeout 180 python3 benchmarks/nvme_split.py --model llama2-7b --contexts 16384 --splits 24,26,28 --repeat 3 \
      > $OUT/nvme_split_16k.md 2>&1
    grep "^|\|###\|profile\|Error" $OUT/nvme_split_16k.md
    echo "=== end $(date +%T)"
    ;;
  D)
    for n in 4096 16384; do
      echo "=== nvme auto $((n / 1024))K $(date +%T)"
      timeout 200 python3 benchmarks/nvme_split.py --model llama2-7b --contexts $n --splits none --repeat 9 --warmup 2 \
        > $OUT/nvme_auto_$((n / 1024))k.md 2>&1
      grep "^|\|###\|profile\|Error" $OUT/nvme_auto_$((n / 1024))k.md
    done
    echo "=== end $(date +%T)"
    ;;
esac

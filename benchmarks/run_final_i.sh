#!/usr/bin/env bash
# GPU calls of the ninth session, in the order run:  bash benchmarks/run_final_i.sh A|B|C
#   (carry .devdeps; logs under $OUT). The variants are ttft_timeline.py's.
#   A: every GPU test (the eighth session's later commits had not run on the GPU: the saver's wrapped forwards,
#      the restore's module split, the lease tweaks); TBT while saving with the saver's wrapped forwards
#      (9 pairs, the bench's NVMe tier); the 7B/4K timeline of mixed save plans (the last 2-4 layers as K/V).
#   B: `hcache bench` on main's code: both shapes at 1K/4K (every method, median of 7), then 7B/16K (median of 5).
#   C: where auto's restore loses time to hcache's at 1K and 16K (B: +3.3 and +3.5 ms, the same plan): the
#      7B timelines of the two, interleaved.
#   D: the captured prefill's attention: split-KV pieces against eager (kernels alone, then 7B timelines at 16K
#      and 4K of hcache with each; "hcache" was eager then). E: the 16K timeline in the other order (its first
#      line: split-KV's forward replayed alone). Then the GPU tests of the captured prefill with split-KV the
#      default: pytest tests/hcache/test_gpu.py -k "captured or modes or restore_into".
#   F (prepared, not run: no device time left): every GPU test with split-KV the default; the 8B/4K timeline of
#      auto with split-KV against eager attention. Then B again: the bench's round-by-round auto / best line.
source benchmarks/device_env.sh

case "${1:-A}" in
  A)
    gpu_tests 190 tests/hstore/test_lease.py tests/hcache/test_gpu.py
    echo "=== tbt $(date +%T)"
    timeout 200 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024 --sources dram \
      --methods recompute --repeat 1 --warmup 0 --tbt-context 1024 --tbt-tokens 64 --tbt-pairs 9 --nvme-gib 24 \
      --out $OUT/tbt > $OUT/tbt.log 2>&1
    grep "TBT" $OUT/tbt.log | tail -1
    timeline 170 4096 7 14 ideal,hcache,mix/kv=2/at=end,mix/kv=3/at=end,mix/kv=4/at=end
    echo "=== end $(date +%T)"
    ;;
  B)
    BENCH_LONG_REPEAT=5 bench_dram 320 240
    ;;
  C)
    timeline 120 1024 9 40 hcache,auto
    timeline 200 16384 4 40 hcache,auto --dram-gib 40
    echo "=== end $(date +%T)"
    ;;
  D)
    echo "=== attention kernels $(date +%T)"
    timeout 100 python3 benchmarks/attention_kernels.py --replays 10 > $OUT/attention_kernels.md 2>&1
    grep -v "Warn\|warn" $OUT/attention_kernels.md | head -40
    timeline 170 16384 3 3 hcache,hcache/attn=hcache_split_kv --dram-gib 40
    grep "TTFT\|restore compute done\|prefill replay end" $OUT/ttft_timeline_7b_16k.md | head -14
    timeline 120 4096 7 3 hcache,hcache/attn=hcache_split_kv
    grep "TTFT\|restore compute done\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -14
    echo "=== end $(date +%T)"
    ;;
  E)
    timeline 170 16384 3 3 hcache/attn=hcache_split_kv,hcache --dram-gib 40
    grep "captured\|TTFT\|compute done\|copies done\|replay end" $OUT/ttft_timeline_7b_16k.md
    ;;
  F)
    gpu_tests 200 tests/hstore/test_lease.py tests/hcache/test_gpu.py
    timeout 150 python3 benchmarks/ttft_timeline.py --model llama3-8b --context 4096 --repeat 7 \
      --methods auto,auto/attn=eager > $OUT/ttft_timeline_8b_4k.md 2>&1
    grep "captured\|TTFT\|compute done\|replay end" $OUT/ttft_timeline_8b_4k.md
    echo "=== end $(date +%T)"
    ;;
esac

#!/usr/bin/env bash
# GPU calls of the eleventh session, in the order run:  bash benchmarks/run_final_k.sh A|B|...
#   (carry .devdeps; logs under $OUT). The variants are ttft_timeline.py's.
#   A: graphs captured on streams of their own (`capture_streams`), with in-place projection graphs the default:
#      do pool streams share cuBLAS workspaces (workspace_sharing.py, both kinds); the GPU tests; the 7B/4K
#      timeline of copying against in-place graphs (median of 7); `hcache bench` of the 7B at 1K/4K (every
#      method, median of 7), the 4K part of which stalled in the tenth session.
#   B: the full bench (both shapes 1K/4K, the 7B at 16K) with its round-by-round auto / best line.
#   C: the 7B/4K call's GPU time by stream with in-place graphs the default (gpu_streams.py); the timeline that
#      stalled in the tenth session (copying, in-place and per-head graphs, median of 9) with auto beside them;
#      16K, copying against in-place graphs (median of 3).
#   D: on a host slow to issue (C's), queuing part of a 4K restore before generate() against all of it: the
#      forward's 7.7 ms of GPU time then overlaps the host issuing the rest (median of 9).
#   E: a fresh lease, hoping for a faster host: 7B/4K copying against in-place graphs, auto, and the eager
#      "ideal" and recompute rows that say how fast the host is (median of 9).
source benchmarks/device_env.sh

case "${1:-A}" in
  A)
    gpu_tests 150 tests/hcache/test_capture_streams.py tests/hstore/test_lease.py tests/hcache/test_gpu.py
    echo "=== workspace sharing $(date +%T)"
    for kind in pool own; do
      timeout 60 python3 benchmarks/workspace_sharing.py --streams $kind > $OUT/workspace_$kind.txt 2>&1
      echo "rc=$?"; grep -v "Warn\|warn" $OUT/workspace_$kind.txt | tail -3
    done
    timeline 130 4096 7 3 hcache/inplace=0,hcache
    grep "TTFT\|restore compute done\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -12
    echo "=== bench 7B 1K/4K $(date +%T)"
    mkdir -p $OUT/short
    timeout 190 python3 -c "import faulthandler, runpy, sys; faulthandler.dump_traceback_later(175); \
sys.argv = ['hcache_adapter'] + sys.argv[1:]; runpy.run_module('hcache_adapter', run_name='__main__')" bench --no-progress \
      --models llama2-7b --contexts 1024,4096 --sources dram --methods recompute,ideal,hf_offloaded,kv,hcache,auto \
      --repeat 7 --warmup 2 --out $OUT/short > $OUT/short/full.log 2>&1
    grep "^|\|###\|round by round\|Timeout\|File" $OUT/short/full.log | cut -c1-150 | head -40
    echo "=== end $(date +%T)"
    ;;
  B)
    BENCH_LONG_REPEAT=5 bench_dram 320 240
    ;;
  C)
    echo "=== streams $(date +%T)"
    timeout 100 python3 benchmarks/gpu_streams.py --model llama2-7b --context 4096 --top 8 --warmup 4 \
      > $OUT/gpu_streams_7b_4k.txt 2>&1
    grep -v "Warn\|warn" $OUT/gpu_streams_7b_4k.txt | grep -A9 "^stream\|^kernels" | head -40
    timeline 160 4096 9 6 hcache/inplace=0,hcache,hcache/heads=1,auto
    grep "TTFT\|restore compute done\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -16
    timeline 170 16384 3 4 hcache/inplace=0,hcache --dram-gib 40
    grep "TTFT\|restore compute done\|prefill replay end" $OUT/ttft_timeline_7b_16k.md | head -8
    echo "=== end $(date +%T)"
    ;;
  D)
    timeline 150 4096 9 5 hcache,hcache/ahead=256,hcache/ahead=512
    grep "TTFT\|restore issued\|restore compute done\|first forward start\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -18
    echo "=== end $(date +%T)"
    ;;
  E)
    timeline 150 4096 9 8 ideal,recompute,hcache/inplace=0,hcache,auto
    grep "TTFT\|ideal\|restore issued\|restore compute done\|first forward start\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -18
    echo "=== end $(date +%T)"
    ;;
esac

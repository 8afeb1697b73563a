#!/usr/bin/env bash
# GPU calls of the tenth session, in the order run:  bash benchmarks/run_final_j.sh A|B|...
#   (carry .devdeps; logs under $OUT). The variants are ttft_timeline.py's.
#   A: where the 7B/4K call's GPU time goes, stream by stream (gpu_streams.py); the 4K timeline of hcache
#      against restores that queue only part of their work before generate() (ahead=MiB), the rest as the
#      captured forward takes the layers.
#   B: projection graphs that write K/V in place (into their outputs, or the captured prefill's static cache;
#      the default when B-E ran, opt-in since, so the methods below name it): the GPU tests, the 7B/4K timeline
#      of the copying graphs against in-place ones and per-head GEMMs (heads=1), then the streams with it on.
#      (The timeline ran out of its 150 s, printing nothing.)
#   C: B's timeline again, with every thread's stack dumped if it runs long: copying against in-place graphs, then
#      heads=1 alone. (A slow host: hcache's restore took 21.6 ms of host time to issue, against 11.3 in A.)
#   D: on a fresh lease, the three interleaved (7B/4K, median of 9); then `hcache bench` of the 7B at 1K/4K
#      (every method, median of 7) with its round-by-round auto / best line. (The timeline ran out of time
#      again, in generate()'s stop check, i.e. waiting on the GPU; the bench did its 1K, not its 4K.)
#   E: what holds the 4K runs with two instances that write in place: hcache,auto with dynamo's recompile log
#      and every thread's stack every 40 s. (It finished: hcache 32.4 ms, auto 32.9, one recompile for the
#      destination's strides; the 40 s dump fell in the support probe.)
#   F (prepared, refused: no device time left): the bench's 4K alone (7B; recompute, ideal, kv, hcache, auto;
#      median of 7): does it finish, and auto / best. (Meant with in-place graphs, then the default; the bench
#      has no switch for them, so it now measures the copying graphs.)
source benchmarks/device_env.sh

case "${1:-A}" in
  A)
    echo "=== streams $(date +%T)"
    timeout 120 python3 benchmarks/gpu_streams.py --model llama2-7b --context 4096 --top 10 > $OUT/gpu_streams_7b_4k.txt 2>&1
    grep -v "Warn\|warn" $OUT/gpu_streams_7b_4k.txt | head -70
    timeline 200 4096 7 3 hcache,hcache/ahead=96,hcache/ahead=256,hcache/ahead=512
    grep "TTFT\|restore compute done\|restore issued\|first forward start\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -24
    echo "=== end $(date +%T)"
    ;;
  B)
    gpu_tests 200 tests/hstore/test_lease.py tests/hcache/test_gpu.py
    timeline 150 4096 7 3 hcache,hcache/inplace=1,hcache/heads=1
    grep "TTFT\|restore compute done\|restore copies done\|prefill replay end" $OUT/ttft_timeline_7b_4k.md | head -16
    echo "=== streams $(date +%T)"
    timeout 100 python3 benchmarks/gpu_streams.py --model llama2-7b --context 4096 --top 8 --warmup 3 \
      > $OUT/gpu_streams_7b_4k.txt 2>&1
    grep -v "Warn\|warn" $OUT/gpu_streams_7b_4k.txt | grep -A9 "^stream\|^kernels" | head -40
    echo "=== end $(date +%T)"
    ;;
  C|D)
    watched() {  # watched SECONDS OUTFILE ARGS...: ttft_timeline.py, its threads' stacks dumped after SECONDS
      local t=$1 f=$2; shift 2
      echo "=== $* $(date +%T)"
      timeout $((t + 20)) python3 -c "import faulthandler, runpy, sys; faulthandler.dump_traceback_later($t, exit=True); \
sys.argv = ['ttft_timeline.py'] + sys.argv[1:]; runpy.run_path('benchmarks/ttft_timeline.py', run_name='__main__')" "$@" > "$f" 2>&1
      grep "TTFT\|restore compute done\|restore copies done\|prefill replay end\|captured prefill" "$f" | head -16
      grep -B2 -A12 "most recent call first" "$f" | grep -v "^$" | head -60
    }
    if [ "$1" = C ]; then
      watched 130 $OUT/ttft_timeline_7b_4k_inplace.md --model llama2-7b --context 4096 --repeat 7 --methods hcache,hcache/inplace=1
      watched 80 $OUT/ttft_timeline_7b_4k_heads.md --model llama2-7b --context 4096 --repeat 5 --methods hcache/heads=1
    else
      watched 150 $OUT/ttft_timeline_7b_4k_inplace.md --model llama2-7b --context 4096 --repeat 9 \
        --methods hcache,hcache/inplace=1,hcache/heads=1
      echo "=== bench 7B 1K/4K $(date +%T)"
      mkdir -p $OUT/short
      timeout 210 python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 1024,4096 --sources dram \
        --methods recompute,ideal,hf_offloaded,kv,hcache,auto --repeat 7 --warmup 2 --out $OUT/short > $OUT/short/full.log 2>&1
      grep "^|\|###\|round by round" $OUT/short/full.log | cut -c1-150 | head -40
    fi
    echo "=== end $(date +%T)"
    ;;
  F)
    mkdir -p $OUT/short
    timeout 140 python3 -c "import faulthandler, runpy, sys; faulthandler.dump_traceback_later(120); \
sys.argv = ['hcache_adapter'] + sys.argv[1:]; runpy.run_module('hcache_adapter', run_name='__main__')" bench --no-progress \
      --models llama2-7b --contexts 4096 --sources dram --methods recompute,ideal,kv,hcache,auto --repeat 7 --warmup 2 \
      --out $OUT/short > $OUT/short/full.log 2>&1
    grep "^|\|###\|round by round\|Timeout\|File" $OUT/short/full.log | cut -c1-150 | head -40
    echo "=== end $(date +%T)"
    ;;
  E)
    TORCH_LOGS=recompiles timeout 125 python3 -c "import faulthandler, runpy, sys; \
faulthandler.dump_traceback_later(40, repeat=True); sys.argv = ['ttft_timeline.py'] + sys.argv[1:]; \
runpy.run_path('benchmarks/ttft_timeline.py', run_name='__main__')" --model llama2-7b --context 4096 --repeat 3 \
      --methods hcache/inplace=1,auto/inplace=1 > $OUT/hang_7b_4k.txt 2>&1
    grep -v "^\s*$" $OUT/hang_7b_4k.txt | grep -i "recompil\|TTFT\|Timeout\|most recent\|hcache_adapter\|reason\|guard\|utils.py\|cuda" | head -70
    echo "=== end $(date +%T)"
    ;;
esac

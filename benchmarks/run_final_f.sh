#!/usr/bin/env bash
# GPU calls of the sixth session, in the order run:  bash benchmarks/run_final_f.sh O|Q|R|S|P|P2
#   (carry .devdeps; logs under $OUT). Each stage ran the code as it was then; the variants are ttft_timeline.py's.
#   O: GPU tests of the read lease and the restores, then TTFT timelines of one 7B request at 4K and 16K: the
#      restore's chunks leased once and every free slot's copies queued first (the default) against reading each
#      layer with get_many_into three layers ahead (lease=0/look=3, the fifth session's code), each change alone,
#      and a plan whose last 3 layers are K/V.
#   Q: (per-layer leases; restores still queued every free slot's copies first, as Restorer.inline_lookahead
#      overrode the loader's own default) timelines at 4K and 16K against get_many_into reads (lease=0, also every
#      free slot) and look=32 (the same as the default), then a cProfile of hc.generate at 4K.
#   R: (leases of 8 layers, every free slot first) timelines at 4K and 16K: against get_many_into reads (lease=0,
#      every free slot first), and the projection's input copied by a kernel (copyin=sm, a variant since removed:
#      it was neutral, 33.4 vs 33.6 ms and 97.6 vs 96.0).
#   S: timelines at 4K and 16K with less of the restore queued before generate() (ahead=MiB).
#   P: `hcache bench` with this session's defaults (as run_final_e.sh M), then the GPU tests of the final code.
#   P2: the same bench again on the same lease (the first run's 16K had a round of ~0.8 s), 16K median of 5.
source benchmarks/device_env.sh

case "${1:-O}" in
  O)
    gpu_tests 120 tests/hstore/test_lease.py tests/hcache/test_gpu.py \
      -k "lease or matches_prefill or issued_ahead or starting_with_kv or restore_into"
    timeline 230 4096 7 13 recompute,ideal,hcache,hcache/lease=0/look=3,hcache/look=3,hcache/lease=0,mix/kv=3/at=end
    timeline 170 16384 3 10 recompute,ideal,hcache,hcache/lease=0/look=3 --dram-gib 40
    echo "=== end $(date +%T)"
    ;;
  Q)
    timeline 220 4096 7 12 recompute,ideal,hcache,hcache/lease=0,hcache/look=32,mix/kv=3/at=end
    timeline 150 16384 3 9 recompute,ideal,hcache,hcache/lease=0 --dram-gib 40
    echo "=== profile $(date +%T)"
    timeout 100 python3 benchmarks/generate_profile.py --model llama2-7b --context 4096 --calls 5 --top 40 \
      > $OUT/generate_profile_7b_4k.txt 2>&1; grep -c . $OUT/generate_profile_7b_4k.txt
    echo "=== end $(date +%T)"
    ;;
  R)
    timeline 200 4096 7 12 recompute,ideal,hcache,hcache/lease=0,hcache/copyin=sm,mix/kv=3/at=end
    timeline 150 16384 3 9 recompute,ideal,hcache,hcache/copyin=sm --dram-gib 40
    echo "=== end $(date +%T)"
    ;;
  S)
    timeline 150 4096 7 10 ideal,hcache,hcache/ahead=128,hcache/ahead=256,hcache/ahead=512
    timeline 120 16384 3 8 ideal,hcache,hcache/ahead=256 --dram-gib 40
    echo "=== end $(date +%T)"
    ;;
  P2)
    BENCH_LONG_REPEAT=5 bench_dram 200 240
    ;;
  P)
    bench_dram 330 150
    gpu_tests 100 tests/hstore/test_lease.py tests/hcache/test_gpu.py -k "lease or matches_prefill or modes or captured"
    ;;
esac

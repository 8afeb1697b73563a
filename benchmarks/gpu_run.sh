#!/usr/bin/env bash
# Everything we run on the lent GPU machine, as stages of one call (device time is scarce).
#
#   bash ../shared/device/pack.sh          # once, here: wheels + liburing for the GPU machine
#   then, on the device (carry .devdeps):  bash benchmarks/gpu_run.sh STAGE [STAGE ...]
#
# Stages:
#   tests      the GPU tests (GPU tier, async puts, fp16 restores; projections bit-exact per architecture)
#   errors     fp16 max abs error of restored K/V per architecture and method (DRAM and NVMe)
#   breakdown  where a 7B/4K restore's time goes (benchmarks/restore_breakdown.py)
#   chatid     is greedy-token identity a fair check on a GPU (benchmarks/chat_identity.py)
#   tbt        where saving during decoding costs time (benchmarks/tbt_profile.py)
#   store      `hstore bench` on the machine's disk: NVMe vs raw O_DIRECT, DRAM, NVMe -> pinned -> GPU
#   quick      `hcache bench` on llama2-7b at 4K only (a fast look at the targets)
#   full       `hcache bench` as committed under benchmarks/results/ (both models, 1K/4K/8K, chat, TBT);
#              extra options in $BENCH_ARGS
# Logs and results land under $OUT (or ./gpu-out when OUT is unset).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -f .devdeps/install.sh ]; then source .devdeps/install.sh; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1 || { echo "build failed"; tail -20 "$OUT/build.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, hstore.io as io; print('torch', torch.__version__, 'transformers', transformers.__version__, 'io', 'uring' if io.uring_available() else io.uring_unavailable_reason())"
df -h /tmp | tail -1

stage() { echo; echo "=== $1 ($(date +%T))"; }
for s in "$@"; do
  case "$s" in
    tests)
      stage tests
      timeout 300 python3 -m pytest -q -x -s tests/test_gpu.py tests/test_projection.py -k "cuda or gpu or float16" 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -E "fp16 max|passed|failed|Error" ;;
    errors)
      stage errors
      timeout 300 python3 benchmarks/fp16_errors.py --out "$OUT/fp16_errors.md" 2>&1 | tail -40 ;;
    breakdown)
      stage breakdown
      timeout 240 python3 benchmarks/restore_breakdown.py --context 4096 2>&1 | tee "$OUT/breakdown.log" | head -60 ;;
    chatid)
      stage chatid
      timeout 240 python3 benchmarks/chat_identity.py 2>&1 | tee "$OUT/chat_identity.log" | tail -20 ;;
    tbt)
      stage tbt
      timeout 240 python3 benchmarks/tbt_profile.py 2>&1 | tee "$OUT/tbt.log" | head -80 ;;
    store)
      stage store
      timeout 240 python3 -m hstore.cli bench /tmp/hstore-bench --no-progress --csv "$OUT/hstore_bench.csv" 2>&1 \
        | tee "$OUT/hstore_bench.txt" ;;
    quick)
      stage quick
      timeout 420 python3 -m hcache_adapter bench --models llama2-7b --contexts 4096 --repeat 3 --tbt-context 1024 \
        --tbt-tokens 64 --tbt-pairs 4 --chat-rounds 0 --out "$OUT/quick" 2>&1 | grep -v "it/s\|step/s\|s/step" | tail -30 ;;
    full)
      stage full
      mkdir -p "$OUT/results"
      timeout 580 python3 -m hcache_adapter bench --out "$OUT/results" ${BENCH_ARGS:-} 2>&1 \
        | grep -v "it/s\|step/s\|s/step" | tee "$OUT/results/full.log" | tail -60 ;;
    *) echo "unknown stage $s" ;;
  esac
done

#!/usr/bin/env bash
# Everything we run on the lent GPU machine, as stages of one call (device time is scarce).
#
#   bash ../shared/device/pack.sh          # once, here: wheels, liburing and redis for the GPU machine
#   then, on the device (carry .devdeps):  bash benchmarks/gpu_run.sh STAGE [STAGE ...]
#
# Stages:
#   tests      the GPU tests (tests/hcache/test_gpu.py, and the projections in float16)
#   breakdown  where TTFT goes, host vs GPU per stage, for the 7B and 8B shapes at 4K (ttft_breakdown.py)
#   quick      `hcache bench`, both shapes, 1K and 4K from DRAM, 4K from NVMe, 5 repetitions
#   full       `hcache bench` as committed under benchmarks/results/ (both shapes, 1K..32K, DRAM and NVMe);
#              extra options in $BENCH_ARGS
#   errors     fp16 max abs error of restored K/V per architecture (benchmarks/fp16_errors.py)
#   projspeed  the generic projection against the fast path, 7B shape (benchmarks/projection_speed.py)
#   store      `hstore bench` on the machine's disk: NVMe vs raw O_DIRECT, DRAM, NVMe -> pinned -> GPU
#   serve      the serving GPU tests, then `hcache serve-bench --preset gpu-7b` (chat + documents, 7B shape,
#              ~5 minutes) -> $OUT/serve_bench; extra options in $SERVE_ARGS
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
      timeout 420 python3 -m pytest -q -x -s -p no:cacheprovider tests/hcache/test_gpu.py \
        "tests/hcache/test_projection.py" -k "cuda or gpu or float16 or captured or modes or tier or graphed or put" 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -E "fp16|error|passed|failed|Error|assert" | head -40 ;;
    breakdown)
      stage breakdown
      for m in llama2-7b llama3-8b; do
        timeout 240 python3 benchmarks/ttft_breakdown.py --model $m --context 4096 2>&1 | tee -a "$OUT/breakdown.log" \
          | grep -v "^ *[0-9]* *[0-9.]* *[0-9.]* *[0-9.]* *[0-9.]* .*{built-in\|^$" | head -90
      done ;;
    quick)
      stage quick
      timeout 560 python3 -m hcache_adapter bench --models llama2-7b,llama3-8b --contexts 1024,4096 --nvme-contexts 4096 \
        --repeat 5 --warmup 2 --long-repeat 3 --no-progress --out "$OUT/quick" 2>&1 | tail -70 ;;
    full)
      stage full
      mkdir -p "$OUT/results"
      timeout 590 python3 -m hcache_adapter bench --no-progress --out "$OUT/results" ${BENCH_ARGS:-} 2>&1 \
        | tee "$OUT/results/full.log" | tail -120 ;;
    errors)
      stage errors
      timeout 300 python3 benchmarks/fp16_errors.py --out "$OUT/fp16_errors.md" 2>&1 | tail -40 ;;
    projspeed)
      stage projspeed
      timeout 240 python3 benchmarks/projection_speed.py 2>&1 | tee "$OUT/projection_speed.txt" | tail -20 ;;
    serve)
      stage serve
      mkdir -p "$OUT/serve_bench"
      timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/hcache/test_batched.py tests/hcache/test_resident.py \
        tests/hcache/test_serve_bench.py -k "gpu" 2>&1 | tee "$OUT/serve_tests.log" | tail -15
      timeout 420 python3 -m hcache_adapter serve-bench --preset gpu-7b --no-progress --out "$OUT/serve_bench" \
        ${SERVE_ARGS:-} 2>&1 | tee "$OUT/serve_bench/serve_bench.log" | tail -60 ;;
    store)
      stage store
      timeout 240 python3 -m hstore.cli bench /tmp/hstore-bench --no-progress --csv "$OUT/hstore_bench.csv" 2>&1 \
        | tee "$OUT/hstore_bench.txt" ;;
    *) echo "unknown stage $s" ;;
  esac
done

# Sourced by the run_final_*.sh stages on the GPU machine: installs the carried .devdeps, puts this checkout
# first on PYTHONPATH, builds the io_uring binding, and prints the GPU; defines `bench_dram`, `gpu_tests` and
# `timeline`. Logs go under $OUT.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
source .devdeps/install.sh >/dev/null 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# bench_dram SECONDS_1K4K SECONDS_16K: `hcache bench` from DRAM, both shapes at 1K/4K (every method, median of 7)
# into $OUT/short, then the 7B at 16K (median of 3 after 2 warm-ups: the second captures) into $OUT/long; the tables go to stdout.
bench_dram() {
  echo "=== 1K/4K $(date +%T)"
  mkdir -p $OUT/short $OUT/long
  timeout "$1" python3 -m hcache_adapter bench --no-progress --models llama2-7b,llama3-8b --contexts 1024,4096 \
    --sources dram --methods recompute,ideal,hf_offloaded,kv,hcache,auto --repeat 7 --warmup 2 --out $OUT/short > $OUT/short/full.log 2>&1
  grep "^|\|###" $OUT/short/full.log | cut -c1-120 | head -50; tail -2 $OUT/short/full.log
  echo "=== 16K $(date +%T)"
  timeout "$2" python3 -m hcache_adapter bench --no-progress --models llama2-7b --contexts 16384 --sources dram \
    --long-methods recompute,ideal,hcache,auto --long-repeat "${BENCH_LONG_REPEAT:-3}" --long-warmup 2 --out $OUT/long > $OUT/long/full.log 2>&1
  grep "^|\|###" $OUT/long/full.log | cut -c1-120 | head -14; tail -2 $OUT/long/full.log; echo "=== end $(date +%T)"
}

# gpu_tests SECONDS PYTEST_ARGS...: the named GPU tests, their summary line and any failures.
gpu_tests() {
  local t=$1; shift
  echo "=== tests $(date +%T)"
  timeout "$t" python3 -m pytest -q -p no:cacheprovider "$@" > $OUT/gpu_tests.log 2>&1
  tail -1 $OUT/gpu_tests.log; grep -i "error\|failed" $OUT/gpu_tests.log | head -8
}

# timeline SECONDS CONTEXT REPEAT LINES METHODS [EXTRA...]: one 7B timeline into $OUT/ttft_timeline_7b_<K>k.md.
timeline() {
  local t=$1 n=$2 repeat=$3 lines=$4 methods=$5; shift 5
  local out=$OUT/ttft_timeline_7b_$((n / 1024))k.md
  echo "=== timeline $((n / 1024))K $(date +%T)"
  timeout "$t" python3 benchmarks/ttft_timeline.py --model llama2-7b --context "$n" --repeat "$repeat" \
    --methods "$methods" "$@" > "$out" 2>&1
  grep -v "Warn\|warn" "$out" | head -"$lines"
}

#!/usr/bin/env bash
# The prepared GPU check: one command that ends inside a 10-minute limit, on a CUDA machine with no
# network whose Python already has torch.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Preflight first: without a GPU it stops within seconds (exit 2). Then, by value, under one shared
# deadline: build (ptxas's register and spill counts into the summary), build_info, the CUDA tests,
# the GPU benchmark, the decode benchmark (the fused decode step against the existing path),
# compute-sanitizer memcheck and racecheck on scripts/sanitizer_case.py (then
# initcheck and synccheck), the layer and projection benchmarks, the FP8 table's error and lookup
# speed (benchmarks/fp8_error.py at the layer's GPU shape and the demo's table), the host table's
# prefetch benchmark (the demo's table size in host memory, looked up with and without prefetch),
# the CPU tests. Each step gets min(its cap, the time left less a reserve for the summary); one that
# cannot get its minimum is recorded as "skipped: no time".
# OUT_DIR receives summary.md (rewritten at every step, so a run cut short keeps its rows), log.txt,
# the gate benchmark's gate_cuda.md, .csv (rewritten per case) and .png, and the layer's
# layer_cuda.md (rewritten per case), .png, projection_cuda.md, fp8_cuda.md, prefetch_cuda.md and
# decode_cuda.md.
# Exit: 0 every step that ran passed, 1 a step failed or timed out (summary: FAIL or INCOMPLETE),
# 2 no GPU, 64 usage.
#
# Environment: GPU_CHECK_BUDGET (seconds for everything, default 540), GPU_CHECK_STEPS (a comma list
# of step names: only those run, the others are recorded as "skipped: not selected"; e.g. a second
# run of the steps the first had no time for, after "build"), PYTHON (default python3),
# TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200).
set -uo pipefail

readonly DEFAULT_BUDGET=540
readonly SUMMARY_RESERVE=15  # seconds kept back for the summary, a killed step's grace included
readonly KILL_GRACE=5        # a step that ignores SIGTERM at its limit is killed this much later
readonly PREFLIGHT_TIMEOUT=45
readonly DEFAULT_ARCH=9.0
readonly CUDA_TEST_WORKERS=8  # one GPU: more processes than this only queue on it
readonly PER_TEST_TIMEOUT=120
readonly BENCH_MIN_TIME=0.2
readonly LAYER_CASES=1x8192x4x4096x1024:bfloat16,1x8192x4x2560x1024:float32
readonly PROJECTION_CASES=8192x4x4096x1024:bfloat16,8192x4x2560x1024:float32
readonly FP8_CASES=1x8192x4x4096x1024:bfloat16
readonly DEMO_TABLE_ROWS=646400  # the demo's rows per head of each n-gram order
readonly SANITIZER_PRINT_LIMIT=20
readonly TAIL_LINES=15        # of a failed step's output, into the highlights
readonly LOG_MAX_BYTES=$((15 * 1024 * 1024))  # the device returns files of at most 16 MiB
readonly BUILD_DIR=build/gpu_check
readonly PACKAGE=torch_ext/retrieval_attention

# Step caps and the least time worth starting each with, in seconds.
readonly BUILD_CAP=240 BUILD_MIN=60
readonly BUILD_INFO_CAP=60 BUILD_INFO_MIN=10
readonly CUDA_TESTS_CAP=150 CUDA_TESTS_MIN=30
readonly BENCH_CAP=150 BENCH_MIN=30
readonly DECODE_BENCH_CAP=60 DECODE_BENCH_MIN=15
readonly LAYER_BENCH_CAP=150 LAYER_BENCH_MIN=45 PROJECTION_BENCH_CAP=45 PROJECTION_BENCH_MIN=15
readonly FP8_BENCH_CAP=45 FP8_BENCH_MIN=15
readonly MEMCHECK_CAP=75 RACECHECK_CAP=75 INITCHECK_CAP=60 SYNCCHECK_CAP=60 SANITIZER_MIN=30
readonly PREFETCH_BENCH_CAP=60 PREFETCH_BENCH_MIN=20
readonly CPU_TESTS_CAP=300 CPU_TESTS_MIN=30

if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
  exit 64
fi
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 64  # before the cd below: OUT_DIR is relative to the caller
cd "$(dirname "$0")/.." || exit 64
summary=$out/summary.md
log=$out/log.txt
work=$(mktemp -d)
budget=${GPU_CHECK_BUDGET:-$DEFAULT_BUDGET}
deadline=$((SECONDS + budget))
PY=${PYTHON:-python3}
jobs=$(nproc)
cuda_bin=${CUDA_HOME:-/usr/local/cuda}/bin
nvcc=$(command -v nvcc || echo "$cuda_bin/nvcc")
sanitizer=$(command -v compute-sanitizer || echo "$cuda_bin/compute-sanitizer")
export PYTHONPATH=$PWD/torch_ext PYTHONUNBUFFERED=1

state="running"  # running, no-gpu, finished or interrupted
exit_code=0
step_pid=""
running_row=""
: >"$log"
: >"$work/rows"
: >"$work/highlights"

# Rewrites summary.md from what is known so far; cheap, so it runs before and after every step.
write_summary() {
  local failed timed_out skipped verdict
  failed=$(grep -c '| FAIL' "$work/rows")
  timed_out=$(grep -c '| TIMEOUT' "$work/rows")
  skipped=$(grep -c '| skipped' "$work/rows")
  case $state in
    no-gpu) verdict="**No GPU**: nothing was built or run (see the preflight below)." ;;
    running) verdict="**Running** (or cut short): the rows below are the steps so far." ;;
    interrupted) verdict="**Interrupted**: the rows below are the steps that ran." ;;
    *)
      verdict="PASS"
      [ "$timed_out" -eq 0 ] || verdict="INCOMPLETE"
      [ "$failed" -eq 0 ] || verdict="FAIL"
      verdict="**$verdict**: $failed failed, $timed_out timed out, $skipped skipped."
      ;;
  esac
  {
    echo "# GPU check"
    echo
    echo "$verdict ${SECONDS} s of a ${budget} s budget."
    echo
    echo "## Preflight"
    echo
    echo '```'
    cat "$work/preflight" 2>/dev/null
    echo '```'
    if [ "$state" != no-gpu ]; then
      echo
      echo "## Steps"
      echo
      echo "| step | result | exit | time | limit |"
      echo "|---|---|---|---|---|"
      cat "$work/rows"
      [ -n "$running_row" ] && echo "$running_row"
    fi
    if [ -s "$work/ptxas.md" ]; then
      echo
      echo "## Registers and spills (ptxas -v)"
      echo
      cat "$work/ptxas.md"
    fi
    if [ -s "$work/highlights" ]; then
      echo
      echo "## Highlights"
      echo
      echo '```'
      cat "$work/highlights"
      echo '```'
    fi
    if [ -f "$out/gate_cuda.md" ]; then
      echo
      sed 's/^# /## /' "$out/gate_cuda.md"
    fi
  } >"$summary"
}

# Always leaves a summary: at the end, at an early stop, and when the script itself is signalled.
finish() {
  if [ -n "$step_pid" ]; then
    kill -TERM "$step_pid" 2>/dev/null
    wait "$step_pid" 2>/dev/null
    running_row=${running_row/running, or killed while running/stopped: the check was interrupted}
  fi
  [ "$state" = running ] && state=finished
  write_summary
  if [ "$(stat -c %s "$log")" -gt "$LOG_MAX_BYTES" ]; then
    { head -c $((LOG_MAX_BYTES / 4)) "$log"; printf '\n[... log.txt cut to fit ...]\n'; tail -c $((LOG_MAX_BYTES / 2)) "$log"; } \
      >"$work/log" && cp "$work/log" "$log"
  fi
  cat "$summary"
  rm -rf "$work"
  exit "$exit_code"
}
trap finish EXIT
trap 'state=interrupted; exit_code=1; exit' TERM INT HUP

# step NAME CAP MIN COMMAND...: runs COMMAND under min(CAP, time left); output into log.txt (and
# $work/NAME.out), a row into the summary. Returns 0 if it passed.
step() {
  local name=$1 cap=$2 min=$3 left limit start offset rc result
  shift 3
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
    skip "$name" "not selected (GPU_CHECK_STEPS)"
    return 0
  fi
  left=$((deadline - SECONDS - SUMMARY_RESERVE))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt "$min" ]; then
    skip "$name" "no time (${left} s left, needs ${min} s)"
    return 1
  fi
  echo "===== $name (limit ${limit} s): $*" >>"$log"
  running_row="| $name | running, or killed while running | | | ${limit} s |"
  write_summary
  offset=$(stat -c %s "$log")
  start=$SECONDS
  # In the background, so that a signal to this script is handled at once, not after the step.
  timeout --kill-after="$KILL_GRACE" "$limit" "$@" >>"$log" 2>&1 &
  step_pid=$!
  wait "$step_pid"
  rc=$?
  step_pid=""
  running_row=""
  tail -c +$((offset + 1)) "$log" >"$work/$name.out"
  case $rc in
    0) result=pass ;;
    124 | 137) result="TIMEOUT" ;;
    *) result="FAIL" ;;
  esac
  echo "| $name | $result | $rc | $((SECONDS - start)) s | ${limit} s |" >>"$work/rows"
  [ "$rc" -eq 0 ] || exit_code=1
  note "$name" "$rc"
  write_summary
  [ "$rc" -eq 0 ]
}

skip() {
  echo "| $1 | skipped: $2 | | | |" >>"$work/rows"
  echo "===== $1: skipped: $2" >>"$log"
  write_summary
}

# note NAME RC: the lines of a step's output worth reading first, into the highlights.
note() {
  local name=$1 rc=$2 file=$work/$1.out lines
  lines=$(
    case $name in
      build) grep -E "ptxas (warning|error)|error:" "$file" | head -n 20 ;;
      build_info) tail -n 5 "$file" ;;
      *tests) grep -E "^(FAILED|ERROR) " "$file" | head -n 30
        grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s" "$file" | tail -n 1 ;;
      bench) grep -E "skipped|copy bandwidth" "$file" ;;
      decode_bench | layer_bench | projection_bench | fp8_bench | prefetch_bench) grep -E "^\| [0-9]" "$file" ;;
      memcheck | racecheck | initcheck | synccheck)
        grep -E "^=+ (Invalid|Uninitialized|Barrier|Program hit|Error|Warning)" "$file" | sort | uniq -c | sort -rn | head -n 10
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitizer case" "$file" ;;
    esac
    if [ "$rc" -ne 0 ]; then
      echo "(exit $rc; the last lines:)"
      tail -n "$TAIL_LINES" "$file"
    fi
  )
  [ -z "$lines" ] || printf -- '--- %s\n%s\n' "$name" "$lines" >>"$work/highlights"
}

# ---- Preflight: is there a GPU that torch sees? Versions for the record either way.
preflight() {
  local smi_ok=0
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(uname -n); CPUs: $jobs"
    if command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi -L >"$work/smi" 2>&1; then
      smi_ok=1
      cat "$work/smi"
      echo "driver: $(timeout 20 nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
    else
      echo "nvidia-smi: $(command -v nvidia-smi >/dev/null && head -n 1 "$work/smi" || echo 'not found')"
    fi
    echo "nvcc: $([ -x "$nvcc" ] && "$nvcc" --version | grep -o 'release [0-9.]*, V[0-9.]*' || echo 'not found')"
    echo "compute-sanitizer: $([ -x "$sanitizer" ] && echo "$sanitizer" || echo 'not found')"
  } >>"$work/preflight" 2>&1
  # One interpreter start for every Python fact the steps need.
  timeout "$PREFLIGHT_TIMEOUT" "$PY" - >"$work/pyfacts" 2>&1 <<'PY'
import importlib.util
import sys

print(f"python: {sys.version.split()[0]} ({sys.executable})")
import torch

print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}")
print(f"xdist: {int(importlib.util.find_spec('xdist') is not None)}")
print(f"pytest_timeout: {int(importlib.util.find_spec('pytest_timeout') is not None)}")
print(f"cuda_available: {int(torch.cuda.is_available())}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PY
  cat "$work/pyfacts" >>"$work/preflight"
  cat "$work/preflight" >>"$log"
  [ "$smi_ok" -eq 1 ] && grep -q "^cuda_available: 1" "$work/pyfacts"
}

fact() { sed -n "s/^$1: //p" "$work/pyfacts"; }

if ! preflight; then
  state=no-gpu
  exit_code=2
  echo "No GPU: nvidia-smi must list one and torch.cuda.is_available() must be True; stopping." | tee -a "$work/preflight" "$log" >&2
  exit
fi

# ---- Build: from scratch, for this machine's torch; a library carried from elsewhere must not pass.
arch=${TORCH_CUDA_ARCH_LIST:-$DEFAULT_ARCH}
rm -f "$PACKAGE"/_C*.so "$PACKAGE"/libretrieval_attention*.so
# --force makes setup.py delete BUILD_DIR first: CMake configures and ninja compiles everything again.
if ! step build "$BUILD_CAP" "$BUILD_MIN" env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" FORCE_CUDA=1 \
  CMAKE_ARGS="-DRA_PTXAS_VERBOSE=ON" "$PY" setup.py build_ext --inplace --force --build-temp "$BUILD_DIR"; then
  timeout 30 "$PY" scripts/ptxas_table.py "$work/build.out" >"$work/ptxas.md" 2>&1
  for name in build_info cuda_tests bench decode_bench memcheck racecheck initcheck synccheck layer_bench \
    projection_bench fp8_bench prefetch_bench cpu_tests; do
    skip "$name" "the build did not pass"
  done
  exit
fi
timeout 30 "$PY" scripts/ptxas_table.py "$work/build.out" >"$work/ptxas.md" 2>&1

# The library just built, for this torch, with the CUDA kernels in.
step build_info "$BUILD_INFO_CAP" "$BUILD_INFO_MIN" "$PY" -c "
import torch, retrieval_attention as ra
info = ra.build_info()
print(info, ra._C.__file__, sep='\n')
assert info['cuda'], 'the CUDA kernels are not compiled in'
built, running = info['torch_version'].split('.')[:2], torch.__version__.split('.')[:2]
assert built == running, f'built against torch {built}, running {torch.__version__}'
"

# ---- Tests: pytest-xdist and pytest-timeout where installed; the CPU cores shared among the workers.
pytest_args=(-p no:cacheprovider -rfE -q)
[ "$(fact pytest_timeout)" = 1 ] && pytest_args+=(--timeout="$PER_TEST_TIMEOUT")
cuda_workers=1 cpu_workers=1 cuda_xdist=() cpu_xdist=()
if [ "$(fact xdist)" = 1 ]; then
  cuda_workers=$((CUDA_TEST_WORKERS < jobs ? CUDA_TEST_WORKERS : jobs))
  cpu_workers=$jobs
  cuda_xdist=(-n "$cuda_workers")
  cpu_xdist=(-n "$cpu_workers")
fi
step cuda_tests "$CUDA_TESTS_CAP" "$CUDA_TESTS_MIN" env OMP_NUM_THREADS=$((jobs / cuda_workers)) \
  "$PY" -m pytest tests -k cuda "${cuda_xdist[@]}" "${pytest_args[@]}"

# ---- The benchmark at the Engram shapes; its table and CSV are rewritten after every case.
step bench "$BENCH_CAP" "$BENCH_MIN" "$PY" benchmarks/bench_gate.py --device cuda --min-time "$BENCH_MIN_TIME" \
  --out "$out"

# ---- Decoding a token per call, batches of 1 and 64: the fused decode step against the existing path.
step decode_bench "$DECODE_BENCH_CAP" "$DECODE_BENCH_MIN" "$PY" benchmarks/bench_decode.py --device cuda \
  --min-time "$BENCH_MIN_TIME" --out "$out"

# ---- compute-sanitizer. Without the caching allocator every tensor is its own allocation, so an
# out-of-bounds access is not hidden inside a larger block and reused memory does not look initialized.
sanitizer_args=(--error-exitcode 1)
if "$sanitizer" --help 2>/dev/null | grep -q -- "--print-limit"; then
  sanitizer_args+=(--print-limit "$SANITIZER_PRINT_LIMIT")
fi
# torch's own probes of optional driver entry points fail by design; a failed launch of ours raises anyway.
if "$sanitizer" --help 2>/dev/null | grep -q -- "--report-api-errors"; then
  sanitizer_args+=(--report-api-errors no)
fi
sanitize() {
  local tool=$1 cap=$2
  if [ -n "${sanitizer_unsupported:-}" ]; then
    skip "$tool" "compute-sanitizer does not support this device"
    return
  fi
  step "$tool" "$cap" "$SANITIZER_MIN" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$sanitizer" --tool "$tool" "${sanitizer_args[@]}" "$PY" scripts/sanitizer_case.py
  if [ -f "$work/$tool.out" ] && grep -q -i "device not supported" "$work/$tool.out"; then
    sanitizer_unsupported=1
  fi
}
if [ -x "$sanitizer" ]; then
  sanitize memcheck "$MEMCHECK_CAP"
  sanitize racecheck "$RACECHECK_CAP"
  sanitize initcheck "$INITCHECK_CAP"
  sanitize synccheck "$SYNCCHECK_CAP"
else
  for tool in memcheck racecheck initcheck synccheck; do skip "$tool" "compute-sanitizer not found"; done
fi

# ---- The whole layer (hashing, lookup, projection, gate, convolution) at the GPU's shapes and the
# demo's table size, against the demo's math eager and compiled; then the projection layouts.
step layer_bench "$LAYER_BENCH_CAP" "$LAYER_BENCH_MIN" "$PY" benchmarks/bench_layer.py --device cuda \
  --min-time "$BENCH_MIN_TIME" --table-rows "$DEMO_TABLE_ROWS" --cases "$LAYER_CASES" --out "$out"
step projection_bench "$PROJECTION_BENCH_CAP" "$PROJECTION_BENCH_MIN" "$PY" benchmarks/bench_projection.py \
  --device cuda --min-time "$BENCH_MIN_TIME" --cases "$PROJECTION_CASES" --out "$out"
# The FP8 table (e4m3, UE8M0 scales per 32 columns) against the bfloat16 one: the layer's error, the
# memory per row, and the lookup's speed.
step fp8_bench "$FP8_BENCH_CAP" "$FP8_BENCH_MIN" "$PY" benchmarks/fp8_error.py --device cuda \
  --min-time "$BENCH_MIN_TIME" --table-rows "$DEMO_TABLE_ROWS" --cases "$FP8_CASES" --out "$out"

# ---- The host table (the demo's size) looked up after a stand-in for the preceding layers,
# with and without prefetch (worker thread and side stream): how much of the lookup is hidden.
step prefetch_bench "$PREFETCH_BENCH_CAP" "$PREFETCH_BENCH_MIN" "$PY" benchmarks/bench_prefetch.py --device cuda \
  --min-time "$BENCH_MIN_TIME" --table-rows "$DEMO_TABLE_ROWS" --out "$out"

# ---- The CPU suite, last, with whatever time is left.
step cpu_tests "$CPU_TESTS_CAP" "$CPU_TESTS_MIN" env OMP_NUM_THREADS=$((jobs / cpu_workers)) \
  "$PY" -m pytest tests -k "not cuda" "${cpu_xdist[@]}" "${pytest_args[@]}"

#!/usr/bin/env bash
# The prepared GPU check, for a CUDA machine with no network whose Python already has torch:
# builds the extension against that torch, runs the whole test suite (the CUDA cases
# included: parity, opcheck, compile, CUDA graphs, Engram sizes), compute-sanitizer
# memcheck, racecheck, initcheck (reads of uninitialized device memory) and synccheck
# (barriers in divergent code, bad warp syncs) on a small case, and the GPU benchmark.
# Writes summary.md, log.txt and the benchmark's table, CSV and chart to the folder given
# (5 files). Budget: under 10 minutes on an H200.
#
#   scripts/gpu_check.sh OUT_DIR          PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0)
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/torch_ext PYTHONUNBUFFERED=1 FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
summary=$out/summary.md
log=$out/log.txt
failed=0

# step NAME SECONDS COMMAND...: runs it under a time limit, its output into log.txt, a row into summary.md.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "===== $name: $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "| $name | $rc | $(($(date +%s) - start)) s |" >>"$summary"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

{
  echo "# GPU check"
  echo
  echo '```'
  nvidia-smi -L 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)"
  echo '```'
  echo
  echo "| step | exit | time |"
  echo "|---|---|---|"
} >"$summary"
: >"$log"

# --force: a library carried from another machine, built against another torch, must not pass for up to date.
if step build 300 "$PY" setup.py build_ext --inplace --force; then
  step build_info 60 "$PY" -c "import retrieval_attention as r; print(r.build_info())"
  step tests 300 "$PY" -m pytest tests -q -p no:cacheprovider -rfE
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck initcheck synccheck; do
    step "$tool" 180 "$sanitizer" --tool "$tool" --error-exitcode 1 "$PY" scripts/sanitizer_case.py
  done
  step bench 240 "$PY" benchmarks/bench_gate.py --device cuda --min-time 0.2 --out "$out"
fi

{
  echo
  echo "## Highlights"
  echo '```'
  grep -E "^(FAILED|ERROR) |passed|failed|error" "$log" | grep -v "^=====" | tail -n 30
  grep -A4 "worst error against" "$log"
  # Each compute-sanitizer tool's summary line, named by its step.
  awk '/^===== /{step=$2; sub(/:$/, "", step)} /ERROR SUMMARY|RACECHECK SUMMARY/{print step ": " $0}' "$log"
  echo '```'
  [ -f "$out/gate_cuda.md" ] && cat "$out/gate_cuda.md"
} >>"$summary"
cat "$summary"
exit "$failed"

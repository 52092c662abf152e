#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU: the environment, a build of the extension
# with the machine's torch and nvcc, the CUDA tests, and the CUDA benchmarks (float32, then
# bfloat16), each stage's log and results under $OUT (default: ./gpu-check-out).
#
#   bash scripts/gpu_check.sh
#   GPU_CHECK_BUDGET=420 TORCH_CUDA_ARCH_LIST=9.0 bash scripts/gpu_check.sh
#
# The whole run keeps to GPU_CHECK_BUDGET seconds (default 450): each stage gets at most its own
# limit and what is left of the budget after the stages that follow have their minimum. A stage
# that fails or runs out of time is reported, and the next one still runs. A table of the stages
# (exit status, seconds, log) is printed last.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
START=$(date +%s)
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The GPU at hand only (Hopper: 9.0); setup.py builds 8.0 and 9.0 unless told.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

SUMMARY=()

# run_stage NAME MAX_SECONDS RESERVE_SECONDS COMMAND...: runs COMMAND with its output in
# $OUT/NAME.log, for at most MAX_SECONDS and at most what the budget leaves after
# RESERVE_SECONDS for the stages after it.
run_stage() {
  local name=$1 max=$2 reserve=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START) - reserve))
  local limit=$((max < left ? max : left))
  if ((limit < 10)); then
    SUMMARY+=("$(printf '| %-16s | skipped: %s s left of the budget | | |' "$name" "$left")")
    return
  fi
  local begin
  begin=$(date +%s)
  echo "== $name (at most ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local seconds=$(($(date +%s) - begin))
  local verdict="exit $rc"
  ((rc == 124 || rc == 137)) && verdict="stopped at its ${limit} s limit"
  tail -n 3 "$OUT/$name.log"
  SUMMARY+=("$(printf '| %-16s | %-28s | %4s | %s |' "$name" "$verdict" "$seconds" "$name.log")")
}

environment() {
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv
  "$PYTHON" - <<'EOF'
import platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "CUDA", torch.version.cuda)
print("cuDNN", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("multiprocessors", p.multi_processor_count, "capability", f"{p.major}.{p.minor}")
EOF
  nvcc --version | tail -n 2
  if git rev-parse HEAD >/dev/null 2>&1; then
    echo "commit $(git rev-parse HEAD)"
    git status --porcelain --untracked-files=no | sed 's/^/changed: /'
  else
    echo "commit unknown (no git history in this copy)"
  fi
}

# (A function runs under timeout in a shell of its own.)
export -f environment

# The minimum each later stage is left: build 150 s, tests 60 s, each benchmark 45 s.
run_stage environment 30 300 bash -c environment
run_stage build 240 150 "$PYTHON" setup.py build_ext --inplace
# The cell options' CUDA kernels are opt-in (not yet validated on a GPU): their tests run here.
run_stage tests 150 90 env RNNFAST_CUDA_CELL_OPTIONS=1 "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/test_cuda.py
run_stage bench-float32 170 45 "$PYTHON" benchmarks/run.py --device cuda --dtype float32 \
  --json "$OUT/cuda-float32.json" --plot "$OUT/cuda-float32.png"
run_stage bench-bfloat16 170 0 "$PYTHON" benchmarks/run.py --device cuda --dtype bfloat16 \
  --json "$OUT/cuda-bfloat16.json" --plot "$OUT/cuda-bfloat16.png"

echo
echo "gpu_check: $(($(date +%s) - START)) s of a ${BUDGET} s budget; results in $OUT"
echo "| stage            | result                       |    s | log |"
echo "|---|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"

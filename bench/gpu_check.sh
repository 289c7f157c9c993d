#!/usr/bin/env bash
# One-shot check on a machine with a GPU: build from source against the installed torch, run
# the whole test suite (the `device` fixture adds CUDA), run the benchmarks on CUDA, and print
# a short summary last. Usage (repo root): bash bench/gpu_check.sh [--quick]
# Output also goes to $OUT (when set) as gpu_check.log and the benchmark JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/ftops_gpu_check}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
summary=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

start=$(date +%s)
FTOPS_CUDA=ON FTOPS_CUDA_ARCHS=${FTOPS_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=16 \
  $PY -m pip install -q --no-build-isolation --no-deps --no-index . 2>&1 | tail -20
rc=${PIPESTATUS[0]}
summary+=("build: rc=$rc in $(( $(date +%s) - start )) s")
[ "$rc" -eq 0 ] || { printf '%s\n' "${summary[@]}"; exit 1; }
$PY -c "import ftops; print(ftops.build_info())"

start=$(date +%s)
(cd /tmp && $PY -m pytest -q -x --no-header -p no:cacheprovider "$OLDPWD/tests" 2>&1) | tee "$OUTDIR/tests.log" | tail -25
summary+=("tests: $(grep -E '[0-9]+ (passed|failed)' "$OUTDIR/tests.log" | tail -1) in $(( $(date +%s) - start )) s")

start=$(date +%s)
(cd bench && $PY run.py --device cuda "$@" 2>&1) | tee "$OUTDIR/bench.log" | tail -60
cp bench/results/*.json "$OUTDIR"/ 2>/dev/null || true
summary+=("bench: $(grep -E 'benchmarks run' "$OUTDIR/bench.log" | tail -1) in $(( $(date +%s) - start )) s")

echo; echo "=== gpu_check summary"; printf '%s\n' "${summary[@]}"

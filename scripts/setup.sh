#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and the build/test/bench dependencies, then builds
# and installs ftops into it against that torch. Safe to re-run: the C++/CUDA build is
# incremental (build/). Environment knobs:
#   PYTHON        interpreter for the venv (default python3)
#   FTOPS_TORCH   torch requirement (default torch==2.14.1: the CUDA build, so nvcc compiles the
#                 .cu files too; torch==2.13.0 gives a small CPU-only torch)
#   FTOPS_CUDA    AUTO (default), ON (fail without nvcc) or OFF (skip the CUDA kernels)
#   FTOPS_VENV    the venv's folder (default .venv); another one builds in build/<its name>/, so
#                 that two torch versions never share a CMake cache
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${FTOPS_TORCH:-torch==2.14.1}
VENV=$(realpath -m "${FTOPS_VENV:-.venv}")

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
echo "[setup] installing $TORCH and build tools"
$PIP install -q "$TORCH" "scikit-build-core>=0.10" "cmake>=3.26" ninja pybind11 numpy
echo "[setup] building ftops (FTOPS_CUDA=${FTOPS_CUDA:-AUTO})"
build_dir=()
[ "$VENV" = "$(realpath -m .venv)" ] || build_dir=(-C "build-dir=build/$(basename "$VENV")/{wheel_tag}")
$PIP install -q --no-build-isolation "${build_dir[@]}" ".[test,bench]"
(cd / && "$VENV/bin/python" -c "import ftops; print('[setup] ftops', ftops.__version__, ftops.build_info())")

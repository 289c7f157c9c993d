#!/usr/bin/env bash
# Builds, on a machine without a GPU, the wheel that bench/gpu_check.sh installs on a lent GPU
# machine instead of compiling there (the build took 143 s of a session's 15 device minutes on
# 2026-11-26). The wheel must match that machine's torch (2.11.0+cu130 on the H100/H200
# machines) and GPU (sm_90); the CUDA toolkit here (nvcc 13.0) matches their CUDA 13.0.
# Usage (repo root): bash bench/build_gpu_wheel.sh   -> .gpu-wheel/ftops-*.whl
# then pass `carry: [".gpu-wheel"]` to the device call that runs bench/gpu_check.sh.
#   GPU_TORCH   torch requirement of the GPU machine (default torch==2.11.0)
#   GPU_ARCHS   CUDA architectures (default 90)
#   GPU_AB_BASE a commit: also build its wheel into .gpu-wheel/base/, and gpu_check.sh times the
#               MeZO passes of both builds back to back (an A/B of kernel changes on one machine)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${GPU_TORCH:-torch==2.11.0}
VENV=.venv-gpu-wheel
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH" "scikit-build-core>=0.10" "cmake>=3.26" ninja pybind11 numpy
rm -f .gpu-wheel/ftops-*.whl .gpu-wheel/source.sha256  # (an earlier base/ stays: GPU_AB_BASE replaces it)
FTOPS_CUDA=ON FTOPS_CUDA_ARCHS=${GPU_ARCHS:-90} "$VENV/bin/python" -m pip wheel -q --no-build-isolation \
  --no-deps -C "build-dir=build/gpu-wheel/{wheel_tag}" -w .gpu-wheel .
bash bench/source_hash.sh > .gpu-wheel/source.sha256  # gpu_check.sh: is the wheel still current?
if [ -n "${GPU_AB_BASE:-}" ]; then
  base=$(git rev-parse --verify "$GPU_AB_BASE^{commit}")
  rm -rf .gpu-wheel/base
  src=build/gpu-ab-src
  git worktree remove --force "$src" 2>/dev/null || rm -rf "$src"
  git worktree add -q --detach "$src" "$base"
  FTOPS_CUDA=ON FTOPS_CUDA_ARCHS=${GPU_ARCHS:-90} "$VENV/bin/python" -m pip wheel -q --no-build-isolation \
    --no-deps -C "build-dir=$(pwd)/build/gpu-wheel-base/{wheel_tag}" -w .gpu-wheel/base "$src"
  git worktree remove --force "$src"
  echo "$base" > .gpu-wheel/base/commit
  ls -la .gpu-wheel/base
fi
ls -la .gpu-wheel

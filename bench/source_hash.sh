#!/usr/bin/env bash
# Prints one hash of everything a build of ftops compiles or packages (csrc/, ftops/,
# CMakeLists.txt, pyproject.toml): bench/build_gpu_wheel.sh stores it beside the wheel, and
# bench/gpu_check.sh installs that wheel only while the sources still hash the same.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc ftops CMakeLists.txt pyproject.toml -type f \( -name '*.py' -o -name '*.h' -o -name '*.cpp' \
  -o -name '*.cu' -o -name '*.cuh' -o -name '*.txt' -o -name '*.toml' \) -not -path '*/__pycache__/*' \
  | LC_ALL=C sort | while read -r f; do printf '%s\n' "$f"; sha256sum < "$f"; done | sha256sum | cut -d' ' -f1

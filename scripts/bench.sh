#!/usr/bin/env bash
# Sets up .venv and runs the benchmark suite (CPU by default). Extra arguments go to
# bench/run.py, e.g. --quick, --device cuda, --only mezo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd bench && exec ../.venv/bin/python run.py "$@"

#!/usr/bin/env bash
# Sets up .venv, then runs the main job: every method fine-tuning MiniLM-L6 on a real text
# classification task (python -m ftops.bench; full mode by default, ~10 min on 2 CPU cores).
# Arguments go to it, e.g. --quick, --methods full,lora,mezo, --device cuda, --out DIR,
# --micro (the microbenchmarks of bench/, via bench/run.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -I: the checkout's ftops/ (source only, no compiled _C.so) must not shadow the installed one.
exec .venv/bin/python -I -m ftops.bench --bench-dir "$PWD/bench" "$@"

#!/usr/bin/env bash
# Sets up .venv and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The pytest script (not `python -m pytest`) so the source tree's ftops/ (no _C.so) does not
# shadow the installed package.
exec "${FTOPS_VENV:-.venv}/bin/pytest" -q "$@"

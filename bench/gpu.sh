#!/usr/bin/env bash
# Every --device cuda benchmark case in one command, within 8 minutes on one H100/H200 (bench/gpu.py says which
# cases, in which order, and how the budget is kept); results in bench/results/gpu-cuda.json.
#
#   bash bench/gpu.sh              # on the GPU machine, after scripts/install.sh (and bench/setup.sh for TRL)
#   bash bench/gpu.sh --dry-run    # any machine: every case builds (meta device), the plan is printed
#   bash bench/gpu.sh --help       # --budget-s, --epochs, --peer, --results
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if [ ! -x "$python" ]; then
    echo "bench/gpu.sh: $python not found: run 'bash scripts/install.sh' first (or set PYTHON to alignprop's python)" >&2
    exit 2
fi
exec "$python" bench/gpu.py "$@"

#!/usr/bin/env bash
# Benchmark set-up: matplotlib in alignprop's .venv (for the plots), and the TRL peer in its own virtualenv
# bench/.peer-venv: trl[diffusers]==0.23.1 (the last release with AlignPropTrainer and DDPOTrainer) with the same torch
# pin as ours (.ci/constraints.txt), so both sides run the same torch, diffusers, transformers and peft builds.
# Safe to re-run. Needs scripts/install.sh to have run first (it creates .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "run 'bash scripts/install.sh' first (it creates .venv)" >&2; exit 1; }
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c .ci/constraints.txt matplotlib

PEER=bench/.peer-venv
PIP=("$PEER/bin/python" -m pip install --quiet --disable-pip-version-check -c .ci/constraints.txt)
[ -x "$PEER/bin/python" ] || "$PYTHON" -m venv "$PEER"
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" "trl[diffusers]==0.23.1" peft
bash scripts/install_torchvision_cpu_hook.sh "$PEER/bin/python"  # the same CPU workaround as scripts/install.sh
"$PEER/bin/python" -c "import trl, diffusers, torch; print('peer ready: trl', trl.__version__, 'diffusers', \
diffusers.__version__, 'torch', torch.__version__)"

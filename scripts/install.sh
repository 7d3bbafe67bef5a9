#!/usr/bin/env bash
# Set up .venv with alignprop-core, the reward plugins and the test tools. Safe to re-run.
#
# torch is pinned through .ci/constraints.txt (torch==2.13.0): on these CPU machines a local CPU wheel is
# picked; elsewhere pip's normal torch 2.13.0 build. Every later install gets the same constraints so that no
# dependency (torchvision via open_clip, say) can pull a different torch with several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c .ci/constraints.txt)

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test]" \
    -e plugins/aesthetic -e plugins/hps -e plugins/pickscore -e plugins/flava-vqa -e plugins/example-reward \
    -e plugins/mps -e "plugins/clipscore[test]" \
    -e "plugins/aesthetic-v25[test]" \
    -e "plugins/imagereward[test]" \
    -e "plugins/hpsv3[test]"

# Test/CI machines without a GPU: a CPU import hook for the CUDA-built PyPI torchvision, only where it is needed.
bash scripts/install_torchvision_cpu_hook.sh .venv/bin/python
echo "alignprop installed in .venv: $(.venv/bin/alignprop rewards | tail -n +2 | cut -d' ' -f1 | tr '\n' ' ')"

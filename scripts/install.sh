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
    -e plugins/aesthetic -e plugins/hps -e plugins/pickscore -e plugins/flava-vqa -e plugins/example-reward

# Test/CI machines without a GPU: the PyPI torchvision wheel is a CUDA build whose compiled ops fail to load on
# CPU torch, which breaks `import transformers`. Only there, install an import hook (scripts/torchvision_cpu_fix.py)
# that declares the missing op schemas. It is an environment workaround, not part of alignprop.
if ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp scripts/torchvision_cpu_fix.py "$site/_alignprop_torchvision_cpu_fix.py"
    echo "import _alignprop_torchvision_cpu_fix; _alignprop_torchvision_cpu_fix.install()" \
        > "$site/_alignprop_torchvision_cpu_fix.pth"
    .venv/bin/python -c "import torchvision, transformers" || { echo "torchvision still fails to import" >&2; exit 1; }
    echo "installed the CPU torchvision import hook (see scripts/torchvision_cpu_fix.py)"
fi
echo "alignprop installed in .venv: $(.venv/bin/alignprop rewards | tail -n +2 | cut -d' ' -f1 | tr '\n' ' ')"

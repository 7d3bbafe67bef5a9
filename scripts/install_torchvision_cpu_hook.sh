#!/usr/bin/env bash
# Usage: scripts/install_torchvision_cpu_hook.sh VENV_PYTHON
# CPU-only machines: the PyPI torchvision wheel is a CUDA build whose compiled ops fail to load on CPU torch, which
# breaks `import transformers`. Only where torchvision is installed and its import fails, this installs an import
# hook (alignprop_core/torchvision_cpu_fix.py, via a .pth file) into that interpreter's site-packages that declares
# the missing op schemas. It is an environment workaround, not part of alignprop. The module runs as a plain script,
# so VENV_PYTHON need not have alignprop installed (bench/setup.sh uses it for the TRL venv); with alignprop
# installed, `python -m alignprop_core.torchvision_cpu_fix install` (or `--check`) does the same.
set -euo pipefail
cd "$(dirname "$0")/.."
"$1" alignprop_core/torchvision_cpu_fix.py install

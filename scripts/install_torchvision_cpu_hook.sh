#!/usr/bin/env bash
# Usage: scripts/install_torchvision_cpu_hook.sh VENV_PYTHON
# CPU-only machines: the PyPI torchvision wheel is a CUDA build whose compiled ops fail to load on CPU torch, which
# breaks `import transformers`. Only where torchvision is installed and its import fails, install an import hook
# (scripts/torchvision_cpu_fix.py, via a .pth file) into that venv that declares the missing op schemas. It is an
# environment workaround, not part of alignprop.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$1
if "$PY" -c "import importlib.util as u; raise SystemExit(u.find_spec('torchvision') is None)" \
        && ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp scripts/torchvision_cpu_fix.py "$site/_alignprop_torchvision_cpu_fix.py"
    echo "import _alignprop_torchvision_cpu_fix; _alignprop_torchvision_cpu_fix.install()" \
        > "$site/_alignprop_torchvision_cpu_fix.pth"
    "$PY" -c "import torchvision, transformers" || { echo "torchvision still fails to import" >&2; exit 1; }
    echo "installed the CPU torchvision import hook (see scripts/torchvision_cpu_fix.py) into $PY"
fi

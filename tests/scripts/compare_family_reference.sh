#!/usr/bin/env bash
# Bitwise comparison of the SD/SDXL family references (tests/scripts/record_family_reference.py) between an earlier
# commit and the working tree, on this machine: tests/test_families.py compares against a file recorded elsewhere
# and skips where the CPU kernels differ; this records both sides here.
#
# usage: bash tests/scripts/compare_family_reference.sh COMMIT     (e.g. 6476421, the code before family adapters)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
COMMIT=${1:?usage: compare_family_reference.sh COMMIT}
WORK=$(mktemp -d /tmp/family-reference.XXXXXX)
git worktree add -q --detach "$WORK/old" "$COMMIT"
trap 'git -C "$ROOT" worktree remove --force "$WORK/old"' EXIT
# before the family adapters, prepare_pipeline lived in alignprop_core.models
sed -e 's/from alignprop_core.families import prepare_pipeline/from alignprop_core.models import prepare_pipeline/' \
    -e "s#^REFERENCE = .*#REFERENCE = Path('$WORK/old.safetensors')#" \
    tests/scripts/record_family_reference.py > "$WORK/record_old.py"
sed -e "s#^REFERENCE = .*#REFERENCE = Path('$WORK/new.safetensors')#" \
    tests/scripts/record_family_reference.py > "$WORK/record_new.py"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
(cd "$WORK" && PYTHONPATH="$WORK/old" "$ROOT/.venv/bin/python" record_old.py)
(cd "$WORK" && PYTHONPATH="$ROOT" "$ROOT/.venv/bin/python" record_new.py)
"$ROOT/.venv/bin/python" - "$WORK" <<'PY'
import sys
import torch
from safetensors import safe_open

def read(path):
    with safe_open(path, "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()

(old, old_meta), (new, new_meta) = (read(f"{sys.argv[1]}/{side}.safetensors") for side in ("old", "new"))
different = [k for k in sorted(old) if k not in new or not torch.equal(old[k], new[k])]
different += [k for k in sorted(old_meta) if old_meta[k] != new_meta.get(k)]
print(f"{len(old)} tensors and {len(old_meta)} hashes/environment entries compared: "
      + ("all bitwise equal" if not different else f"DIFFERENT: {', '.join(different)}"))
sys.exit(1 if different else 0)
PY

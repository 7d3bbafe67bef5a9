#!/usr/bin/env bash
# TRL drop-in check: TRL v0.23.1's own tests/test_alignprop_trainer.py and examples/scripts/alignprop.py (from TRL's
# source distribution on PyPI, never copied into this repository) run against alignprop with only the import line,
# the model id and TRL's pipeline class changed. Runs in the TRL peer venv (bench/setup.sh), where TRL's test helpers
# import; alignprop and its aesthetic plugin are added to that venv (editable, no dependency changes).
#
# usage: bash bench/trl_dropin.sh            (after scripts/install.sh and bench/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PEER=bench/.peer-venv
PY="$ROOT/$PEER/bin/python"
[ -x "$PEER/bin/python" ] || { echo "run 'bash bench/setup.sh' first (it creates $PEER)" >&2; exit 1; }
PIP=("$PEER/bin/python" -m pip install --quiet --disable-pip-version-check -c .ci/constraints.txt)
"${PIP[@]}" parameterized pytest pluggy pyyaml
"${PIP[@]}" --no-deps -e . -e plugins/aesthetic

WORK=$(mktemp -d /tmp/trl-dropin.XXXXXX)
SRC="$WORK/trl-0.23.1"
.venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: trl==0.23.1 -d "$WORK"
tar xzf "$WORK/trl-0.23.1.tar.gz" -C "$WORK"
# TRL's repository has tests/__init__.py (its tests import .testing_utils); the source distribution leaves it out
[ -f "$SRC/tests/__init__.py" ] || touch "$SRC/tests/__init__.py"

# Offline stand-ins for the hub models: the tiny random-weight SD pipeline, and a folder with a tiny CLIP and an
# aesthetic head (aesthetic_scorer uses a CLIP checkpoint found next to the predictor file).
TINY="$WORK/tiny-sd" AESTHETIC="$WORK/tiny-aesthetic" OMP_NUM_THREADS=1 .venv/bin/python - <<'EOF'
import os
import torch
from transformers import CLIPConfig, CLIPModel
from alignprop_core.tiny import build_tiny_pipeline

build_tiny_pipeline(os.environ["TINY"])
folder = os.environ["AESTHETIC"]
torch.manual_seed(0)
small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CLIPModel(CLIPConfig(text_config=small, vision_config={**small, "image_size": 224, "patch_size": 32},
                     projection_dim=32)).save_pretrained(folder)
dims, head = [32, 64, 16, 16, 8, 1], {}
for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
    head[f"layers.{index}.weight"], head[f"layers.{index}.bias"] = torch.randn(d_out, d_in) * 0.1, torch.zeros(d_out)
torch.save(head, os.path.join(folder, "aesthetic-model.pth"))
EOF

TEST="$SRC/tests/test_alignprop_trainer.py"
EXAMPLE="$SRC/examples/scripts/alignprop.py"
cp "$TEST" "$TEST.orig" && cp "$EXAMPLE" "$EXAMPLE.orig"
sed -i "s|from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline|from alignprop_core.trl_compat import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline|" "$TEST"
sed -i "s|\"hf-internal-testing/tiny-stable-diffusion-torch\"|\"$WORK/tiny-sd\"|" "$TEST"
sed -i "s|^from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline$|from alignprop_core.trl_compat import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline, aesthetic_scorer|; /^from trl.models.auxiliary_modules import aesthetic_scorer$/d" "$EXAMPLE"
echo "== what changed in TRL's files"
diff "$TEST.orig" "$TEST" || true
diff "$EXAMPLE.orig" "$EXAMPLE" || true

# TRL's test helpers import trl.trainer.judges, which imports llm_blender whenever is_llm_blender_available() is
# truthy; on transformers 5 that function returns the tuple (False, None), which is. An empty module stands in
# for llm_blender so that TRL's helpers import (the AlignProp tests use no judge).
mkdir -p "$WORK/stubs" && : > "$WORK/stubs/llm_blender.py"
echo "== TRL's tests/test_alignprop_trainer.py against alignprop"
(cd "$SRC" && PYTHONPATH="$WORK/stubs" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/test_alignprop_trainer.py 2>&1 | tail -n 3)

echo "== TRL's examples/scripts/alignprop.py against alignprop (TRL's own flags, tiny sizes)"
RUN="$WORK/example-run"
mkdir -p "$RUN"
(cd "$RUN" && OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PY" "$EXAMPLE" \
    --pretrained_model "$WORK/tiny-sd" --hf_hub_aesthetic_model_id "$WORK/tiny-aesthetic" \
    --num_epochs 3 --train_gradient_accumulation_steps 2 --sample_num_steps 10 --train_batch_size 2 2>&1 | tail -n 6)
echo "== the example's outputs (project_dir ./save)"
(cd "$RUN" && find save -maxdepth 3 | sort | head -n 20)
echo "work folder: $WORK"

#!/usr/bin/env bash
# Train a mask head for the bundled demo detector (its boxes kept bit-identical) and write the
# add-on weights/demo-masks.safetensors (the head only, ~1.3 MB; `--model demo-masks` reads it
# together with weights/demo.safetensors beside it), then measure box and mask AP.
#
#   bash weights/train_demo_masks.sh [WORKDIR]     # WORKDIR default /tmp/ddetr-demo-masks
#   STEPS=N bash weights/train_demo_masks.sh        # optimizer steps (default 4000, batch 2)
#
# Deterministic: data seed 2026 (the demo's own training images, first 400), training seed 0.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/ddetr-demo-masks}"
steps="${STEPS:-4000}"
epochs=$(( (steps * 2 + 399) / 400 ))  # 400 images, batch 2: 200 steps an epoch
mkdir -p "$work"
if [ ! -f "$work/data/coco/train/_annotations.coco.json" ]; then
  python -m ddetr_cli.data.synth dataset "$work/data" --train 400 --val 0 --test 100 --seed 2026 --formats coco
fi
mkdir -p "$work/train/coco"
ln -sfn "$work/data/coco/train" "$work/train/coco/train"  # train split only: no validation passes
ddetr finetune "$work/train/coco" --model "$here/demo.safetensors" --arch masks=true --freeze-boxes \
  --imgsz 256 --batch 2 --lr 1e-3 --epochs "$epochs" --max-steps "$steps" --val-fraction 0 --workers 1 --no-ema \
  --no-register --save-period 25 --out "$work/runs" --name demo-masks
run="$(ls -d "$work"/runs/exp* | tail -1)"
python - "$run/last.safetensors" "$here" <<'PY'
import sys
from pathlib import Path
from ddetr_cli.weights.load import load_model, save_mask_head
here = Path(sys.argv[2])
print(save_mask_head(load_model(sys.argv[1]), here / "demo-masks.safetensors", here / "demo.safetensors"))
PY
ddetr eval "$work/data/coco" --split test --model "$here/demo-masks.safetensors" --imgsz 256 --max-images 50 --max-det 20

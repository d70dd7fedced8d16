#!/usr/bin/env bash
# Retrain the bundled demo model: synthetic data -> ddetr finetune -> ddetr eval -> weights/demo.*
#
#   bash weights/train_demo.sh [WORKDIR]          # WORKDIR default /tmp/ddetr-demo
#   RESUME=1 bash weights/train_demo.sh WORKDIR   # continue an interrupted run, then finish
#   STEPS=N bash weights/train_demo.sh            # stop after N optimizer steps (a shorter run)
#
# Every step is deterministic (data seed 2026, training seed 0). The card's mAP is measured with
# `ddetr eval` on the held-out split, which tests/test_evaluate.py regenerates and re-measures.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/ddetr-demo}"
seed=2026
mkdir -p "$work"
if [ ! -f "$work/data/coco/train/_annotations.coco.json" ]; then
  python -m ddetr_cli.data.synth dataset "$work/data" --train 3000 --val 200 --test 300 --seed "$seed" --formats coco
fi
args=(--scratch --variant box-refine
      --arch backbone_depth=18 --arch backbone_width=32 --arch d_model=128 --arch nheads=8
      --arch enc_layers=3 --arch dec_layers=3 --arch dim_feedforward=512 --arch num_queries=50 --arch dropout=0.0
      --imgsz 256 --batch 4 --lr 2e-4 --lr-backbone 2e-4 --epochs 10 --lr-drop 7 --workers 1 --save-period 100
      --out "$work/runs" --name demo-train)
[ -n "${STEPS:-}" ] && args+=(--max-steps "$STEPS")
if [ -n "${RESUME:-}" ]; then
  ddetr finetune --resume "$(ls -d "$work"/runs/exp* | tail -1)" ${STEPS:+--max-steps "$STEPS"}
else
  ddetr finetune "$work/data/coco" "${args[@]}"
fi
run="$(ls -d "$work"/runs/exp* | tail -1)"
python "$here/write_demo_card.py" "$run" "$work/data" "$seed"

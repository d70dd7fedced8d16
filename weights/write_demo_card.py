"""Copy a finished demo run's best model to weights/demo.safetensors and write weights/demo.md
with the mAP that `ddetr eval` measures on the held-out split (python weights/write_demo_card.py RUN DATA SEED)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
# the demo model's tracking thresholds (``ddetr video --track`` defaults), chosen from the grid of
# ``python benchmarks/bench_track.py --sweep`` (mean IDF1 over its clips); kept in the weights'
# metadata (weights.load.update_config: the tensors are not touched)
TRACK_HIGH, TRACK_LOW = 0.5, 0.2


def main() -> None:
    run, data, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    n_test = len(json.loads((data / "coco" / "test" / "_annotations.coco.json").read_text())["images"])
    dst = here / "demo.safetensors"
    shutil.copyfile(run / "best.safetensors", dst)
    from ddetr_cli.weights.load import update_config

    update_config(dst, track_high=TRACK_HIGH, track_low=TRACK_LOW)
    out = subprocess.run(["ddetr", "eval", str(data / "coco"), "--split", "test", "--model", str(dst), "--json",
                          "--out", str(run / "heldout_eval")], check=True, capture_output=True, text=True).stdout
    m = json.loads(out)["metrics"]
    rows = list(csv.DictReader(open(run / "results.csv")))
    args = json.loads((run / "args.json").read_text())
    from ddetr_cli.weights.load import read_weights

    cfg, sd, _ = read_weights(dst)
    params = sum(t.numel() for t in sd.values())
    progress = json.loads((run / "progress.json").read_text()) if (run / "progress.json").is_file() else {}
    best = max(rows, key=lambda r: float(r["AP"])) if rows else {}
    status = ("finished" if progress.get("finished") else
              f"stopped after {len(rows)} of {args.get('epochs')} planned epochs (session time ran out); "
              "`RESUME=1 bash weights/train_demo.sh WORKDIR` continues the run")
    status += (f"; the bundled weights are the best validation epoch, {best.get('epoch')} (step {best.get('steps')}: "
               f"`STEPS={best.get('steps')} bash weights/train_demo.sh` reproduces them)" if best else "")
    card = f"""# demo: synthetic shapes detector (Deformable DETR + box refinement, ResNet-18/32, d_model 128)

Bundled so that `ddetr detect examples/images --model demo` works offline on a fresh machine.
Classes: {", ".join(cfg.class_names)}. Default input size {cfg.imgsz} (short side).

| metric | value |
|---|---|
| mAP@[.5:.95] | {m["AP"]:.3f} |
| AP50 | {m["AP50"]:.3f} |
| AP75 | {m["AP75"]:.3f} |
| AR100 | {m["AR100"]:.3f} |

Measured by `ddetr eval` on the held-out test split ({n_test} synthetic images, never seen in
training or validation). Regenerate that split and re-measure:

    python -m ddetr_cli.data.synth dataset /tmp/heldout --train 0 --val 0 --test {n_test} --seed {seed} --formats coco
    ddetr eval /tmp/heldout/coco --split test --model demo

## Tracking
`ddetr video --track` defaults for this model (in the weights' metadata, `ddetr weights info demo`):
`--track-high {cfg.track_high:g}`, `--track-low {cfg.track_low:g}`, the best mean IDF1 of the threshold grid of
`python benchmarks/bench_track.py --sweep` (see the README's tracking section).

## Model
{cfg.variant}, ResNet-{cfg.backbone_depth} with stem width {cfg.backbone_width} (trained from scratch: no
ImageNet weights can be downloaded here), d_model {cfg.d_model}, {cfg.nheads} heads, {cfg.enc_layers}+{cfg.dec_layers}
layers, FFN {cfg.dim_feedforward}, {cfg.num_queries} queries, {cfg.num_feature_levels} levels; {params / 1e6:.2f} M
parameters, float32, {dst.stat().st_size / 1e6:.1f} MB.

## Training
`bash weights/train_demo.sh` (one command: data, training, evaluation, this card). Synthetic
dataset: `python -m ddetr_cli.data.synth dataset DIR --train 3000 --val 200 --test {n_test} --seed {seed}`;
then `ddetr finetune` with: {" ".join(args.get("arch") or [])}, variant {args.get("variant")}, imgsz {args.get("imgsz")},
batch {args.get("batch")}, lr {args.get("lr")} (backbone {args.get("lr_backbone")}) for {args.get("epochs")} epochs with a
x0.1 drop after epoch {args.get("lr_drop")}, AdamW, grad clip
{args.get("clip_max_norm")}, EMA, the reference augmentation scaled to imgsz, on CPU (2 cores, about
1 step/s). Status: {status}. Validation mAP per epoch (200 val images): {", ".join(f"{float(r['AP']):.3f}" for r in rows)}.
"""
    (here / "demo.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()

"""Training throughput: this project's train step vs transformers' DeformableDetrForObjectDetection.

    python benchmarks/bench_train.py                    # CPU, demo-size model, imgsz 320, batch 2
    python benchmarks/bench_train.py --steps 10 --imgsz 256 --device cuda

Both models get the same configuration (ResNet-18, d_model 128, 3+3 layers, 100 queries, 4
levels, auxiliary losses on) and the same pre-augmented batches; each runs a full step (forward,
its own Hungarian-matched loss, backward, grad clip 0.1, AdamW). Steps are interleaved so both
see the same machine load. Prints one markdown table of median step time and images/s.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ddetr_cli.data.datasets import load_dataset  # noqa: E402
from ddetr_cli.engine.trainer import TrainSet, collate, param_groups  # noqa: E402
from ddetr_cli.models.config import ModelConfig  # noqa: E402
from ddetr_cli.models.deformable_detr import DeformableDETR  # noqa: E402
from ddetr_cli.models.losses import SetCriterion  # noqa: E402

DEMO = dict(backbone_depth=18, d_model=128, nheads=8, enc_layers=3, dec_layers=3, dim_feedforward=512, num_queries=100)


def hf_model(num_classes: int) -> torch.nn.Module:
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    cfg = DeformableDetrConfig(
        use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False,
        id2label={i: str(i) for i in range(num_classes)}, label2id={str(i): i for i in range(num_classes)},
        d_model=DEMO["d_model"], encoder_layers=DEMO["enc_layers"], decoder_layers=DEMO["dec_layers"],
        encoder_attention_heads=DEMO["nheads"], decoder_attention_heads=DEMO["nheads"],
        encoder_ffn_dim=DEMO["dim_feedforward"], decoder_ffn_dim=DEMO["dim_feedforward"],
        num_queries=DEMO["num_queries"], auxiliary_loss=True,
    )
    return DeformableDetrForObjectDetection(cfg)


def make_batches(data: Path, imgsz: int, batch: int, n: int) -> list:
    ds = load_dataset(data, "train")
    ts = TrainSet(ds.records, imgsz, seed=0)
    keys = [(i % len(ds), i // len(ds)) for i in range(n * batch)]
    return [collate([ts[k] for k in keys[j * batch : (j + 1) * batch]]) for j in range(n)], len(ds.class_names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "examples" / "data" / "coco")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    batches, num_classes = make_batches(args.data, args.imgsz, args.batch, args.steps + args.warmup)

    ours = DeformableDETR(ModelConfig(num_classes=num_classes, **DEMO)).to(dev).train()
    crit = SetCriterion(num_classes)
    opt_ours = torch.optim.AdamW(param_groups(ours, 2e-4, 2e-5, 1e-4), lr=2e-4, weight_decay=1e-4)
    theirs = hf_model(num_classes).to(dev).train()
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=2e-4, weight_decay=1e-4)

    def step_ours(b) -> float:
        images, mask, targets = b
        targets = [{"labels": t["labels"].to(dev), "boxes": t["boxes"].to(dev)} for t in targets]
        loss = crit(ours(images.to(dev), mask.to(dev)), targets)["loss"]
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.1)
        opt_ours.step()
        return float(loss.detach())

    def step_theirs(b) -> float:
        images, mask, targets = b
        labels = [{"class_labels": t["labels"].to(dev), "boxes": t["boxes"].to(dev)} for t in targets]
        loss = theirs(pixel_values=images.to(dev), pixel_mask=(~mask).long().to(dev), labels=labels).loss
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
        opt_theirs.step()
        return float(loss.detach())

    times: dict[str, list[float]] = {"ddetr": [], "transformers": []}
    for i, b in enumerate(batches):
        for name, fn in (("ddetr", step_ours), ("transformers", step_theirs)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)

    shape = tuple(batches[0][0].shape[-2:])
    print(f"device {args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}, imgsz {args.imgsz} (first batch {shape[0]}x{shape[1]}), "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"model: {DEMO}\n")
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| implementation | s/step (median) | it/s | images/s | speed-up |")
    print("|---|---|---|---|---|")
    for k in ("ddetr", "transformers"):
        print(f"| {k} | {med[k]:.3f} | {1 / med[k]:.2f} | {args.batch / med[k]:.2f} | {med['transformers'] / med[k]:.2f}x |")


if __name__ == "__main__":
    main()

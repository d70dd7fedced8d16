"""`ddetr detect` throughput on a folder of images: the full pipeline (threaded decode, batching,
COCO/annotated-image writing) vs the model alone on the same, already decoded images.

    python benchmarks/bench_detect.py                       # 64 images, small model and R50
    python benchmarks/bench_detect.py --images 16 --models small

Prints one markdown table, measured in one process: the model alone at batch 1, `ddetr detect`
with --batch 1, and `ddetr detect` with its default batching (same-shape images together, up to
``Detector.auto_batch``), with the ratio of the last two.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def make_folder(folder: Path, n: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        cv2.circle(img, (int(rng.integers(50, w - 50)), int(rng.integers(50, h - 50))), 40, (0, 200, 0), -1)
        cv2.imwrite(str(folder / f"img{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def build(kind: str, root: Path) -> Path:
    from ddetr_cli.models.config import ModelConfig
    from ddetr_cli.models.deformable_detr import DeformableDETR
    from ddetr_cli.weights.load import save_model

    torch.manual_seed(0)
    if kind == "small":
        cfg = ModelConfig.from_variant("box-refine", num_classes=5, class_names=list("abcde"), backbone_depth=18,
                                       backbone_width=32, d_model=128, enc_layers=3, dec_layers=3,
                                       dim_feedforward=512, num_queries=50, imgsz=320)
    else:
        cfg = ModelConfig()  # the published multi-scale R50 layout
    return save_model(DeformableDETR(cfg), root / f"{kind}.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", default="640x480", help="WxH of the generated images")
    ap.add_argument("--models", default="small,r50")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from ddetr_cli.data.images import read_image
    from ddetr_cli.engine.detect import run_detect
    from ddetr_cli.engine.predictor import Detector
    from ddetr_cli.ops.cpu import cpu_info

    w, h = map(int, args.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "images"
        folder.mkdir()
        make_folder(folder, args.images, (w, h))
        files = sorted(folder.iterdir())
        for kind in args.models.split(","):
            det = Detector.from_pretrained(build(kind, root), device=args.device)
            auto = det.auto_batch(det.input_shape(h, w))
            arrays = [read_image(f) for f in files]
            det.predict_arrays(arrays[:1])  # warm-up (op build/load, allocator)
            t = time.perf_counter()
            for a in arrays:
                det.predict_arrays([a])
            model_only = time.perf_counter() - t
            rates = {}
            for batch in (1, None):  # None: the default, consecutive same-shape images together
                t = time.perf_counter()
                res = run_detect(det, [str(folder)], root / f"run_{kind}_{batch}", batch=batch, formats=("coco",))
                rates[batch] = len(files) / (time.perf_counter() - t)
                assert res.images == len(files)
            rows.append((kind, det.imgsz, auto, len(files) / model_only, rates[1], rates[None]))
    cpu = f"{cpu_info().name} ({platform.machine()}), {torch.get_num_threads()} threads"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else cpu
    print(f"\n`ddetr detect` on {args.images} JPEGs of {args.size}, {dev}, torch {torch.__version__}\n")
    print("| model | imgsz | model alone, batch 1 (img/s) | detect, --batch 1 (img/s) | detect, default batching (img/s) "
          "| default batch | default / --batch 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, imgsz, auto, mo, one, dflt in rows:
        print(f"| {kind} | {imgsz} | {mo:.2f} | {one:.2f} | {dflt:.2f} | {auto} | {dflt / one:.2f}x |")


if __name__ == "__main__":
    main()

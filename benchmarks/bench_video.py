"""End-to-end ``ddetr video`` throughput vs the model alone on the same frames.

The pipeline decodes, infers and annotates/encodes (H.264 + JSONL) concurrently, so on a machine
where the model is the bottleneck its frames/s should stay close to (target >= 90% of) the
model-only rate measured on pre-decoded frames, with and without ``--track`` (the tracker gets
every detection down to its low threshold). A random tiny model keeps the run near a minute on
CPU; pass --model for a real one (``--model demo`` finds real objects to track). Each round runs
the three back to back (model alone, pipeline, pipeline + --track); the table shows the best of
each over the rounds and the ratio of each round on its own.

    python benchmarks/bench_video.py                  # 1280x720, 24 frames, imgsz 320, tiny model, best of 2
    python benchmarks/bench_video.py --model demo --repeat 3   # the tracking acceptance (>= 90% of the model alone)
    python benchmarks/bench_video.py --threads 2 --batch 2 --imgsz 640
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ddetr_cli.data import synth
from ddetr_cli.engine.predictor import Detector
from ddetr_cli.engine.track import settings_for
from ddetr_cli.engine.video import run_video
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.deformable_detr import DeformableDETR


def tiny_detector(imgsz: int, device: str) -> Detector:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=5, class_names=list(synth.CLASS_NAMES), backbone_depth=18, d_model=64, nheads=4,
                      enc_layers=1, dec_layers=1, dim_feedforward=128, num_queries=20)
    return Detector(DeformableDETR(cfg), device=device, imgsz=imgsz)


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of ``path`` as (H, W, 3) uint8 RGB, the model's input format."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", default="1280x720", help="WxH of the generated clip")
    ap.add_argument("--imgsz", type=int, default=320, help="model input short side")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 avoids OpenMP spin contention on small shared machines)")
    ap.add_argument("--model", default=None, help="weights name/path (default: random tiny model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--conf", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=2, help="alternating rounds; the best of each is reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "bench.mp4"
        synth.make_clip(clip, frames=args.frames, size=(w, h), fps=25, seed=0)
        det = (Detector.from_pretrained(args.model, device=args.device, imgsz=args.imgsz) if args.model
               else tiny_detector(args.imgsz, args.device))
        frames = decode_all(clip)
        settings = settings_for(det.cfg)
        det.predict_arrays(frames[: args.batch], conf=args.conf)  # warm-up: allocator, oneDNN kernels

        # rounds alternate the two runs and the best of each is kept: on a shared machine the load
        # of other processes changes by the second, and the minimum is the least disturbed run
        model_s = pipe_s = track_s = float("inf")
        rounds: list[tuple[float, float, float]] = []  # (model, pipeline, pipeline + track) seconds of each round
        for r in range(args.repeat):
            t = time.perf_counter()
            for i in range(0, len(frames), args.batch):
                det.predict_arrays(frames[i : i + args.batch], conf=args.conf)
            m = time.perf_counter() - t

            t = time.perf_counter()
            res = run_video(det, clip, Path(tmp) / f"run{r}", batch=args.batch, conf=args.conf, save=True, save_json=True,
                            handle_signals=False)
            p = time.perf_counter() - t
            assert res.frames == args.frames, (res.frames, args.frames)

            # tracking as `ddetr video --track` sets it up for this model (card thresholds, gap fills)
            t = time.perf_counter()
            tres = run_video(det, clip, Path(tmp) / f"track{r}", batch=args.batch, conf=args.conf, save=True, save_json=True,
                             track=True, track_settings=settings, handle_signals=False)
            k = time.perf_counter() - t
            assert tres.frames == args.frames, (tres.frames, args.frames)
            rounds.append((m, p, k))
            model_s, pipe_s, track_s = min(model_s, m), min(pipe_s, p), min(track_s, k)

    model_fps, pipe_fps, track_fps = args.frames / model_s, res.frames / pipe_s, tres.frames / track_s
    ratio, track_ratio = pipe_fps / model_fps, track_fps / model_fps
    print(f"\n`ddetr video` on a {w}x{h} clip, {args.frames} frames, imgsz {args.imgsz}, batch {args.batch}, "
          f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), "
          f"output {res.codec} + JSONL, best of {args.repeat}\n")
    print("| run | frames | seconds | frames/s |")
    print("|---|---:|---:|---:|")
    print(f"| model only (frames pre-decoded) | {args.frames} | {model_s:.2f} | {model_fps:.2f} |")
    print(f"| pipeline: decode + model + annotate + H.264 encode + JSONL | {res.frames} | {pipe_s:.2f} | {pipe_fps:.2f} |")
    what = (f"pipeline + --track ({settings.tracker}, high {settings.high:g} / low {settings.low:g}, gaps filled up to "
            f"{settings.fill_s:g} s; {tres.tracks} track ids, {tres.detections} boxes drawn, {tres.interpolated} interpolated)")
    print(f"| {what} | {tres.frames} | {track_s:.2f} | {track_fps:.2f} |")
    for j, (what, v) in enumerate((("pipeline", ratio), ("pipeline + --track", track_ratio)), 1):
        # the same ratio round by round (each round runs the three back to back): how much the load moved it
        per_round = sorted(r[0] / r[j] for r in rounds)
        spread = f"rounds: {', '.join(f'{x:.1%}' for x in per_round)}; median {float(np.median(per_round)):.1%}"
        print(f"| **ratio {what} / model** (best of each) | | | **{v:.2%}** "
              f"{'(>= 90% target met)' if v >= 0.9 else '(below the 90% target)'}; {spread} |")


if __name__ == "__main__":
    main()

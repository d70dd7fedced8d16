"""Tracking quality of ``ddetr video --track`` on synthetic clips with ground truth, per tracker.

Each clip of ``ddetr_cli.data.synth.CLIP_SCENES`` (plus the bundled ``examples/clip.mp4``) goes
through the model once (all detections kept); every tracker setting then runs over those cached
detections exactly as the video pipeline runs it (``track.Tracker`` + ``track.tracked_output``)
and is scored by ``track_eval.score_tracks`` (trackers.eval: TrackEval's HOTA, CLEAR, IDF1).

    python benchmarks/bench_track.py                        # demo model: every tracker, every clip
    python benchmarks/bench_track.py --sweep                # + the high/low threshold grid of the default tracker
    python benchmarks/bench_track.py --model my.safetensors --scenes lines,crossing --frames 90
    python benchmarks/bench_track.py --fills 0,0.25,0.5,1,2 # gap interpolation (--track-fill) grid of the default tracker

"previous" is what ``--track`` did before: ByteTrack on the detections >= --conf only, no
duplicate suppression, no re-linking.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import supervision as sv
import torch

from ddetr_cli.data import synth
from ddetr_cli.engine.predictor import Detector
from ddetr_cli.engine.track import TRACKERS, Tracker, TrackSettings, settings_for, tracked_output
from ddetr_cli.engine.track_eval import score_tracks
from ddetr_cli.formats.mot import TrackFrames, read_clip_json

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = TrackSettings(tracker="bytetrack", high=0.5, low=0.3, nms_iou=1.0, relink_s=0.0, min_frames=2, fill_s=0.0)


def decode(path: Path) -> list[np.ndarray]:
    """Every frame of ``path``, (H, W, 3) uint8 BGR."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


def detect_all(det: Detector, frames: list[np.ndarray]) -> list[sv.Detections]:
    """Every detection the model makes (no score threshold), per frame."""
    return [det.predict_arrays([cv2.cvtColor(f, cv2.COLOR_BGR2RGB)], conf=0.0)[0] for f in frames]


def track(dets: list[sv.Detections], frames: list[np.ndarray], fps: float, settings: TrackSettings, conf: float,
          previous: bool = False) -> tuple[TrackFrames, float]:
    """The pipeline's tracking step over cached detections -> (tracks, mean ms per frame)."""
    h, w = frames[0].shape[:2]
    tracker = Tracker(fps=fps, settings=settings, frame_size=(w, h))
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    spent = 0.0
    for i, (d, img) in enumerate(zip(dets, frames)):
        if previous:  # the old pipeline filtered at --conf before tracking
            d = d[d.confidence >= conf]
        t0 = time.perf_counter()
        kept = tracked_output(tracker.update(d, timestamp=i / fps, frame=img), conf)
        spent += time.perf_counter() - t0
        ok = kept.tracker_id >= 0
        out[i] = (kept.tracker_id[ok], kept.xyxy[ok].astype(np.float64))
        for f in tracker.fills:  # interpolated boxes of earlier frames, as the JSON lines get them
            ids, boxes = out[f.step]
            keep = ids != f.track_id  # a fill that replaces a weak box takes its id
            out[f.step] = (np.append(ids[keep], f.track_id), np.vstack([boxes[keep], f.xyxy[None]]))
    return TrackFrames(out, processed=set(range(len(frames)))), 1000 * spent / max(len(frames), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--scenes", default=",".join(synth.CLIP_SCENES), help="comma-separated, from " + ", ".join(synth.CLIP_SCENES))
    ap.add_argument("--trackers", default=",".join(TRACKERS), help="comma-separated")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--fps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conf", type=float, default=0.3, help="drawing threshold (the video default)")
    ap.add_argument("--sweep", action="store_true", help="also grid the default tracker's high/low thresholds")
    ap.add_argument("--fills", default="", help="comma-separated gap-interpolation limits (s) to compare, e.g. 0,0.5,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder keeping each clip's detections (.npz): later runs (other trackers, --sweep) skip the model")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    det = Detector.from_pretrained(args.model, device=args.device)

    clips: dict[str, tuple[TrackFrames, list[np.ndarray], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        clips["bundled"] = (read_clip_json(ROOT / "examples" / "clip.json"), decode(ROOT / "examples" / "clip.mp4"), 15.0)
        for scene in [s.strip() for s in args.scenes.split(",") if s.strip()]:
            video = Path(tmp) / f"{scene}.mp4"
            truth = synth.make_clip(video, frames=args.frames, size=(w, h), fps=args.fps, seed=args.seed, scene=scene)
            gt = Path(tmp) / f"{scene}.json"
            gt.write_text(json.dumps(synth.clip_json(truth, fps=args.fps, size=(w, h))))
            clips[scene] = (read_clip_json(gt), decode(video), float(args.fps))
    t0 = time.perf_counter()
    dets, n_run = {}, 0
    for name, (_, frames, _) in clips.items():
        key = args.cache / f"{Path(args.model).stem}_{name}_{args.size}_{args.frames}_{args.fps}_{args.seed}.npz" if args.cache else None
        if key is not None and key.is_file():
            z = np.load(key)
            dets[name] = [sv.Detections(xyxy=z[f"b{i}"], confidence=z[f"s{i}"], class_id=z[f"c{i}"]) for i in range(len(frames))]
            continue
        dets[name] = detect_all(det, frames)
        n_run += len(frames)
        if key is not None:
            key.parent.mkdir(parents=True, exist_ok=True)
            arrays = {f"{k}{i}": v for i, d in enumerate(dets[name])
                      for k, v in (("b", d.xyxy), ("s", d.confidence), ("c", d.class_id))}
            np.savez(key, **arrays)
    model_ms = 1000 * (time.perf_counter() - t0) / max(n_run, 1)

    default = settings_for(det.cfg)  # as `ddetr video --track` sets it up for this model (its card's thresholds)
    runs = [("previous", PREVIOUS, True)] + [(name, replace(default, tracker=name), False)
                                              for name in [t.strip() for t in args.trackers.split(",") if t.strip()]]
    if default.fill_s:  # the default tracker without gap interpolation (--track-fill 0)
        at = next((k for k, r in enumerate(runs) if r[0] == default.tracker), len(runs) - 1) + 1
        runs.insert(at, (f"{default.tracker}, --track-fill 0", replace(default, fill_s=0.0), False))
    print(f"\n`ddetr video --track` on synthetic clips ({args.size}, {args.fps} fps, seed {args.seed}), model {args.model} "
          f"({f'{model_ms:.0f} ms/frame' if n_run else 'detections from --cache'}), {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads; "
          f"thresholds high {default.high:g} / low {default.low:g}, duplicate NMS IoU {default.nms_iou:g}, re-link within "
          f"{default.relink_s:g} s, gaps up to {default.fill_s:g} s interpolated, drawing conf {args.conf:g}\n")
    print("| clip | frames | objects | tracker | IDF1 | HOTA | MOTA | ID switches | frag. | mostly tracked | ids | tracker ms/frame |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    means: dict[str, list[float]] = {}
    for name, (truth, frames, fps) in clips.items():
        for label, settings, previous in runs:
            tracks, ms = track(dets[name], frames, fps, settings, args.conf, previous)
            m = score_tracks(truth, tracks)
            means.setdefault(label, []).append(m["IDF1"])
            bold = "**" if label == default.tracker else ""
            print(f"| {name} | {m['frames']} | {m['objects']} | {bold}{label}{bold} | {m['IDF1']:.3f} | {m['HOTA']:.3f} | "
                  f"{m['MOTA']:.3f} | "
                  f"{m['IDSW']} | {m['Frag']} | {m['MT']}/{m['objects']} | {m['tracks']} | {ms:.2f} |")
    print("\n| tracker | mean IDF1 over the clips |\n|---|---:|")
    for label, v in means.items():
        print(f"| {label} | {np.mean(v):.3f} |")

    if args.fills:
        print(f"\ngap interpolation (--track-fill), {default.tracker}: over the {len(clips)} clips\n")
        print("| --track-fill (s) | mean IDF1 | mean HOTA | mean MOTA | ID switches | mostly tracked | false boxes |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for fill in [float(v) for v in args.fills.split(",") if v.strip()]:
            res = [score_tracks(truth, track(dets[n], frames, fps, replace(default, fill_s=fill), args.conf)[0])
                   for n, (truth, frames, fps) in clips.items()]
            print(f"| {fill:g} | {np.mean([r['IDF1'] for r in res]):.3f} | {np.mean([r['HOTA'] for r in res]):.3f} | "
                  f"{np.mean([r['MOTA'] for r in res]):.3f} | {sum(r['IDSW'] for r in res)} | "
                  f"{sum(r['MT'] for r in res)}/{sum(r['objects'] for r in res)} | {sum(r['FP'] for r in res)} |")

    if args.sweep:
        print(f"\nthreshold grid, {default.tracker}: mean IDF1 / total ID switches over the clips\n")
        highs, lows = (0.3, 0.4, 0.5, 0.6, 0.7), (0.05, 0.1, 0.2, 0.3)
        print("| high \\ low | " + " | ".join(f"{lo:g}" for lo in lows) + " |")
        print("|---|" + "---:|" * len(lows))
        for hi in highs:
            cells = []
            for lo in lows:
                if lo > hi:
                    cells.append("")
                    continue
                res = [score_tracks(truth, track(dets[n], frames, fps, replace(default, high=hi, low=lo), args.conf)[0])
                       for n, (truth, frames, fps) in clips.items()]
                cells.append(f"{np.mean([r['IDF1'] for r in res]):.3f} / {sum(r['IDSW'] for r in res)}")
            print(f"| {hi:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

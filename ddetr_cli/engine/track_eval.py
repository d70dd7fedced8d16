"""``ddetr eval --track``: score tracks against MOT-style ground truth.

The metrics are ``trackers.eval``'s (Roboflow's port of TrackEval, the MOTChallenge scorer):
HOTA (DetA, AssA), CLEAR (MOTA, MOTP, ID switches, fragmentations, mostly tracked / lost) and
the identity metrics (IDF1, IDP, IDR), all at IoU 0.5 except HOTA (averaged over 0.05..0.95).

Only the frames the tracker looked at are scored (``--vid-stride`` skips frames; a lost stream
drops some): ground truth of other frames is not counted as missed.

Python API::

    truth = read_truth("examples/clip.json")
    res = evaluate_video(Detector.from_pretrained("demo"), "examples/clip.mp4", truth, out_dir=Path("runs/eval/t"))
    print(res.metrics["IDF1"], res.metrics["IDSW"])
    scores = score_tracks(truth, read_video_jsonl("runs/video/exp/clip.jsonl"))
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddetr_cli.engine.track import TrackSettings, settings_for
from ddetr_cli.files import atomic_write_text
from ddetr_cli.formats.mot import TrackFrames, mot_lines, read_video_jsonl

# name -> what it means, in the order tables show them
METRIC_HELP: dict[str, str] = {
    "IDF1": "identity F1: boxes given the right id, over the whole clip",
    "HOTA": "higher-order tracking accuracy: sqrt(DetA x AssA), mean over IoU 0.05..0.95",
    "MOTA": "1 - (misses + false boxes + id switches) / ground-truth boxes",
    "DetA": "HOTA's detection part",
    "AssA": "HOTA's association part",
    "IDP": "identity precision",
    "IDR": "identity recall",
    "MOTP": "mean IoU of matched boxes",
    "IDSW": "id switches: a ground-truth object changes its tracker id",
    "Frag": "fragmentations: a tracked object is lost and found again",
    "MT": "mostly tracked objects (>80% of their frames)",
    "PT": "partially tracked objects (20-80%)",
    "ML": "mostly lost objects (<20%)",
    "FP": "false boxes",
    "FN": "missed ground-truth boxes",
}


class TrackEvalError(ValueError):
    """Nothing to score (no overlapping frames, no ground truth)."""


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from trackers.eval import box_iou

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return box_iou(a, b)


def drop_distractor_matches(gt: np.ndarray, unscored: np.ndarray, distractor: np.ndarray, ids: np.ndarray, boxes: np.ndarray,
                            iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """MOT17's preprocessing (TrackEval's): track boxes (K, 4) are matched (Hungarian, IoU >=
    ``iou``) to every ground-truth row of the frame, the scored ``gt`` (G, 4) and the
    ``unscored`` (M, 4) alike; those matched to a row flagged in ``distractor`` (M,) are removed:
    they are neither hits nor false positives."""
    from scipy.optimize import linear_sum_assignment

    if not distractor.any() or len(boxes) == 0:
        return ids, boxes
    allgt = np.vstack([gt.reshape(-1, 4), unscored.reshape(-1, 4)])
    sim = _iou(allgt, boxes)
    sim[sim < iou - 1e-10] = 0.0
    r, c = linear_sum_assignment(-sim)
    is_distractor = np.concatenate([np.zeros(len(gt), bool), distractor])
    drop = {int(j) for i, j in zip(r, c) if sim[i, j] > 1e-10 and is_distractor[i]}
    keep = np.array([k not in drop for k in range(len(boxes))], bool)
    return np.asarray(ids)[keep], boxes[keep]


def score_tracks(truth: TrackFrames, tracks: TrackFrames, iou: float = 0.5) -> dict[str, Any]:
    """Metrics of ``tracks`` against ``truth`` over the frames both cover.

    Frames: ``tracks.processed`` (else every truth frame) within ``truth.processed`` (else every
    truth frame with boxes). Track boxes on a distractor of ``truth.ignore`` are not scored.
    Returns {"IDF1", "HOTA", "MOTA", ... (``METRIC_HELP``), "objects", "tracks", "frames",
    "gt_boxes", "boxes"}; fractions in 0..1, counts as ints.
    """
    from trackers.eval import compute_clear_metrics, compute_hota_metrics, compute_identity_metrics

    gt_frames = truth.processed if truth.processed is not None else set(truth.frames)
    frames = sorted(gt_frames if tracks.processed is None else gt_frames & tracks.processed)
    if not frames:
        raise TrackEvalError("no frame is both in the ground truth and in the tracks")
    gmap: dict[int, int] = {}
    tmap: dict[int, int] = {}
    g_ids, t_ids, sims = [], [], []
    for f in frames:
        gi, gb = truth.get(f)
        ti, tb = tracks.get(f)
        if f in truth.ignore and len(tb):
            ti, tb = drop_distractor_matches(np.asarray(gb, np.float64), *truth.ignore[f], ti, np.asarray(tb, np.float64))
        g_ids.append(np.array([gmap.setdefault(int(i), len(gmap)) for i in gi], dtype=int))
        t_ids.append(np.array([tmap.setdefault(int(i), len(tmap)) for i in ti], dtype=int))
        sims.append(_iou(np.asarray(gb, np.float64), np.asarray(tb, np.float64)))
    if not gmap:
        raise TrackEvalError("the ground truth has no boxes in the scored frames")
    clear = compute_clear_metrics(g_ids, t_ids, sims, threshold=iou)
    ident = compute_identity_metrics(g_ids, t_ids, sims, threshold=iou)
    hota = compute_hota_metrics(g_ids, t_ids, sims)
    mean = lambda v: float(np.mean(v))  # noqa: E731 - HOTA values come per IoU threshold
    return {
        "IDF1": float(ident["IDF1"]), "HOTA": mean(hota["HOTA"]), "MOTA": float(clear["MOTA"]),
        "DetA": mean(hota["DetA"]), "AssA": mean(hota["AssA"]), "IDP": float(ident["IDP"]), "IDR": float(ident["IDR"]),
        "MOTP": float(clear["MOTP"]), "IDSW": int(clear["IDSW"]), "Frag": int(clear["Frag"]),
        "MT": int(clear["MT"]), "PT": int(clear["PT"]), "ML": int(clear["ML"]),
        "FP": int(clear["CLR_FP"]), "FN": int(clear["CLR_FN"]),
        "objects": len(gmap), "tracks": len(tmap), "frames": len(frames),
        "gt_boxes": int(sum(len(g) for g in g_ids)), "boxes": int(sum(len(t) for t in t_ids)),
    }


@dataclass
class TrackEvalResult:
    """Scores of one tracked video (``metrics``: ``score_tracks``'s dict) and how it was made."""

    metrics: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "settings": self.settings, "outputs": self.outputs, "seconds": round(self.seconds, 3)}


def write_result(res: TrackEvalResult, out_dir: Path, tracks: TrackFrames) -> None:
    """``track_metrics.json`` and the tracks as MOTChallenge results (``tracks.txt``, for TrackEval)."""
    res.outputs["metrics"] = str(out_dir / "track_metrics.json")
    res.outputs["mot"] = str(out_dir / "tracks.txt")
    atomic_write_text(out_dir / "tracks.txt", mot_lines(tracks.frames))
    atomic_write_text(out_dir / "track_metrics.json", json.dumps(res.to_dict(), indent=1) + "\n")


def evaluate_video(detector: Any, source: str | Path, truth: TrackFrames, out_dir: Path, *, settings: TrackSettings | None = None,
                   conf: float = 0.3, iou: float = 0.5, on_progress: Callable[[Any], None] | None = None,
                   **video_kw: Any) -> TrackEvalResult:
    """Track ``source`` (``ddetr video --track --save-json`` into ``out_dir``) and score it."""
    from ddetr_cli.engine.video import run_video

    settings = settings or settings_for(getattr(detector, "cfg", None))  # the model card's thresholds, else the defaults
    run = run_video(detector, source, out_dir, conf=conf, track=True, track_settings=settings, save_json=True,
                    on_progress=on_progress, **video_kw)
    if run.error:
        raise TrackEvalError(run.error)
    tracks = read_video_jsonl(run.outputs["jsonl"])
    res = TrackEvalResult(score_tracks(truth, tracks, iou), settings={**settings.to_dict(), "conf": conf, "iou": iou,
                                                                      "source": str(source)},
                          outputs=dict(run.outputs), seconds=run.seconds)
    write_result(res, out_dir, tracks)
    return res

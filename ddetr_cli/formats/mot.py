"""Tracking ground truth and results: MOTChallenge text files, ddetr's clip JSON, ``ddetr video`` JSON lines.

Every reader returns ``TrackFrames``: frame index (0-based, as ``ddetr video`` numbers the frames
of a source) -> (ids (K,) int64, boxes (K, 4) float64 xyxy px).

* MOTChallenge ``gt.txt`` / results: ``frame, id, left, top, width, height, conf, class, visibility``
  with 1-based frames and 1-based pixel coordinates (as motmetrics reads them: ``left - 1``);
  ground-truth rows whose ``conf`` (the "consider" flag) is 0 are left out.
* The clip JSON of ``ddetr_cli.data.synth.clip_json`` (``examples/clip.json``): ``{"frames":
  [{"frame", "boxes", "ids", ...}]}``.
* ``ddetr video --track --save-json`` lines: the detections with a ``track_id``; ``processed``
  (the frame indices that have a line) tells which frames were looked at.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class TrackFileError(ValueError):
    """A tracking file that cannot be read (what is wrong, in one line)."""


@dataclass
class TrackFrames:
    """Per-frame ids and boxes of one sequence; ``processed``: frames that were looked at (for
    results: the frames a run produced, with or without boxes), None = every frame of ``frames``."""

    frames: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    processed: set[int] | None = None
    fps: float | None = None

    def get(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (K,), boxes (K, 4) xyxy) of ``frame``; empty when it has none."""
        return self.frames.get(frame, (np.zeros(0, np.int64), np.zeros((0, 4), np.float64)))

    @property
    def ids(self) -> set[int]:
        return {int(i) for ids, _ in self.frames.values() for i in ids}

    @property
    def boxes(self) -> int:
        return sum(len(ids) for ids, _ in self.frames.values())


def _collect(rows: Iterable[tuple[int, int, list[float]]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    by_frame: dict[int, tuple[list[int], list[list[float]]]] = {}
    for frame, tid, box in rows:
        ids, boxes = by_frame.setdefault(frame, ([], []))
        ids.append(tid)
        boxes.append(box)
    return {f: (np.asarray(i, np.int64), np.asarray(b, np.float64).reshape(-1, 4)) for f, (i, b) in sorted(by_frame.items())}


def read_mot_txt(path: str | Path, ground_truth: bool = True) -> TrackFrames:
    """A MOTChallenge text file (``gt.txt`` or a tracker's results) -> TrackFrames (0-based frames)."""
    p = Path(path)
    rows = []
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TrackFileError(f"{p}: cannot read ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.replace(" ", "").split(",") if "," in line else line.split()
        try:
            vals = [float(v) for v in parts[:7]]
        except ValueError:
            raise TrackFileError(f"{p}:{n}: not a MOT row (frame,id,left,top,width,height,...): {line[:60]!r}") from None
        if len(vals) < 6:
            raise TrackFileError(f"{p}:{n}: a MOT row has at least 6 values (frame,id,left,top,width,height), got {len(vals)}")
        frame, tid, x, y, w, h = vals[:6]
        if ground_truth and len(vals) >= 7 and vals[6] == 0:
            continue  # MOTChallenge: "consider" flag 0 = ignore this box
        if frame < 1:
            raise TrackFileError(f"{p}:{n}: MOT frames start at 1, got {frame:g}")
        rows.append((int(frame) - 1, int(tid), [x - 1, y - 1, x - 1 + w, y - 1 + h]))
    if not rows:
        raise TrackFileError(f"{p}: no boxes")
    return TrackFrames(_collect(rows))


def read_clip_json(path: str | Path) -> TrackFrames:
    """ddetr's clip ground truth (``examples/clip.json``) -> TrackFrames. Every listed frame counts,
    also one without boxes."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        frames = doc["frames"]
        rows = [(int(f["frame"]), int(i), [float(v) for v in b]) for f in frames for i, b in zip(f["ids"], f["boxes"], strict=True)]
        processed = {int(f["frame"]) for f in frames}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise TrackFileError(f"{p}: not a clip ground truth JSON ({{'frames': [{{'frame', 'ids', 'boxes'}}]}}): {e}") from None
    return TrackFrames(_collect(rows), processed=processed, fps=doc.get("fps"))


def read_video_jsonl(path: str | Path) -> TrackFrames:
    """``ddetr video --track --save-json`` output -> the tracked boxes per frame; ``processed`` =
    every frame with a line. Detections without a ``track_id`` are not part of any track."""
    p = Path(path)
    rows, processed = [], set()
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TrackFileError(f"{p}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            frame = int(rec["frame"])
            dets = rec["detections"]
        except (ValueError, KeyError, TypeError):
            raise TrackFileError(f"{p}:{n}: not a ddetr video JSON line") from None
        processed.add(frame)
        rows += [(frame, int(d["track_id"]), [float(v) for v in d["box"]]) for d in dets if d.get("track_id") is not None]
    if not processed:
        raise TrackFileError(f"{p}: no frames")
    return TrackFrames(_collect(rows), processed=processed)


def read_truth(path: str | Path) -> TrackFrames:
    """Ground truth by extension: ``.json`` clip JSON, else a MOTChallenge text file."""
    p = Path(path)
    if not p.is_file():
        raise TrackFileError(f"{p}: no such ground truth file")
    return read_clip_json(p) if p.suffix.lower() == ".json" else read_mot_txt(p, ground_truth=True)


def mot_lines(frames: Mapping[int, tuple[np.ndarray, np.ndarray]], scores: Mapping[int, np.ndarray] | None = None) -> str:
    """Tracks (0-based frames, xyxy px) as MOTChallenge result rows (1-based frames and pixels;
    ``conf`` = the score, or 1)."""
    out = []
    for f in sorted(frames):
        ids, boxes = frames[f]
        sc = scores.get(f) if scores else None
        for k, (i, b) in enumerate(zip(ids, boxes)):
            x1, y1, x2, y2 = (float(v) for v in b)
            c = float(sc[k]) if sc is not None else 1.0
            out.append(f"{f + 1},{int(i)},{x1 + 1:.2f},{y1 + 1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{c:.4f},-1,-1,-1")
    return "\n".join(out) + ("\n" if out else "")

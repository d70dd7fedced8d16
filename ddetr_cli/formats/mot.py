"""Tracking ground truth and results: MOTChallenge text files, ddetr's clip JSON, ``ddetr video`` JSON lines.

Every reader returns ``TrackFrames``: frame index (0-based, as ``ddetr video`` numbers the frames
of a source) -> (ids (K,) int64, boxes (K, 4) float64 xyxy px).

* MOTChallenge ``gt.txt`` / results: ``frame, id, left, top, width, height, conf, class, visibility``
  with 1-based frames and 1-based pixel coordinates (as motmetrics reads them: ``left - 1``).
  Ground truth follows MOT17's rules (as TrackEval applies them): rows whose ``conf`` (the
  "consider" flag) is 0 are left out; of the rows with a class, only the target class
  (``MOT_TARGET_CLASSES``: 1, pedestrian) is scored; the distractor classes (2 person on vehicle,
  7 static person, 8 distractor, 12 reflection) are neither objects nor false positives (a track
  box matched to one is not scored, ``TrackFrames.ignore``); other classes (vehicles, occluders)
  are left out. A class of -1 (MOT15) counts as the target class here (trackers' own loader
  scores class 1 only).
* A MOTChallenge sequence folder: ``seqinfo.ini`` (``read_seqinfo``: frame rate, size, length,
  image folder and extension), ``img1/000001.jpg ...``, ``gt/gt.txt``; ``write_mot_sequence``
  writes one (the synthetic clips of ``data.synth`` in this layout).
* The clip JSON of ``ddetr_cli.data.synth.clip_json`` (``examples/clip.json``): ``{"frames":
  [{"frame", "boxes", "ids", ...}]}``.
* ``ddetr video --track --save-json`` lines: the detections with a ``track_id``; ``processed``
  (the frame indices that have a line) tells which frames were looked at.
"""

from __future__ import annotations

import configparser
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddetr_cli.files import atomic_write_text

MOT_TARGET_CLASSES = (1,)
MOT_DISTRACTOR_CLASSES = (2, 7, 8, 12)


class TrackFileError(ValueError):
    """A tracking file that cannot be read (what is wrong, in one line)."""


@dataclass
class TrackFrames:
    """Per-frame ids and boxes of one sequence; ``processed``: frames that were looked at (for
    results: the frames a run produced, with or without boxes), None = every frame of ``frames``."""

    frames: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    processed: set[int] | None = None
    fps: float | None = None
    # ground truth: per frame, the rows that are not scored, (M, 4) xyxy boxes and (M,) bool "is a
    # distractor" (a track box matched to one is not scored either; see track_eval)
    ignore: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

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
    rows: list[tuple[int, int, list[float]]] = []
    ignore: list[tuple[int, int, list[float]]] = []
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
        if frame < 1:
            raise TrackFileError(f"{p}:{n}: MOT frames start at 1, got {frame:g}")
        box = [x - 1, y - 1, x - 1 + w, y - 1 + h]
        if ground_truth:
            cls = _mot_class(parts)
            considered = not (len(vals) >= 7 and vals[6] == 0)  # MOTChallenge: "consider" flag 0 = not scored
            if not considered or (cls != -1 and cls not in MOT_TARGET_CLASSES):
                # not scored; kept for the distractor matching, as TrackEval keeps every row for it
                ignore.append((int(frame) - 1, int(cls in MOT_DISTRACTOR_CLASSES), box))
                continue
        rows.append((int(frame) - 1, int(tid), box))
    if not rows:
        raise TrackFileError(f"{p}: no boxes" + (" to score (MOT17 rules: consider flag 1, class 1 or -1)" if ground_truth else ""))
    return TrackFrames(_collect(rows), ignore={f: (b, d.astype(bool)) for f, (d, b) in _collect(ignore).items()})


def _mot_class(parts: Sequence[str]) -> int:
    """The class column of a MOT row (the 8th), -1 when absent or not a number."""
    try:
        return int(float(parts[7])) if len(parts) >= 8 else -1
    except ValueError:
        return -1


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
    every frame with a line. Detections without a ``track_id`` are not part of any track; boxes
    marked ``"interpolated"`` (gap fills) are, as the tracker's output."""
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
    """Ground truth by extension: ``.json`` clip JSON, else a MOTChallenge text file (frames:
    ``processed`` = the sequence's ``seqLength`` frames when a ``seqinfo.ini`` is beside ``gt/``)."""
    p = Path(path)
    if not p.is_file():
        raise TrackFileError(f"{p}: no such ground truth file")
    if p.suffix.lower() == ".json":
        return read_clip_json(p)
    truth = read_mot_txt(p, ground_truth=True)
    if (p.parent.parent / "seqinfo.ini").is_file():
        info = read_seqinfo(p.parent.parent)
        truth.processed, truth.fps = set(range(info.length)), info.fps
    return truth


def mot_lines(frames: Mapping[int, tuple[np.ndarray, np.ndarray]], scores: Mapping[int, np.ndarray] | None = None) -> str:
    """Tracks (0-based frames, xyxy px) as MOTChallenge result rows (1-based frames and pixels;
    ``conf`` = the score, or 1)."""
    out = []
    for f, k, i, left, top, w, h in _rows(frames):
        c = float(scores[f][k]) if scores and scores.get(f) is not None else 1.0
        out.append(f"{f + 1},{i},{left:.2f},{top:.2f},{w:.2f},{h:.2f},{c:.4f},-1,-1,-1")
    return "\n".join(out) + ("\n" if out else "")


def _rows(frames: Mapping[int, tuple[np.ndarray, np.ndarray]]):
    """Tracks (0-based frames, xyxy px) -> (frame, index in frame, id, left, top, width, height)
    per box, frames in order, left/top 1-based as MOTChallenge counts pixels."""
    for f in sorted(frames):
        ids, boxes = frames[f]
        for k, (i, b) in enumerate(zip(ids, boxes)):
            x1, y1, x2, y2 = (float(v) for v in b)
            yield f, k, int(i), x1 + 1, y1 + 1, x2 - x1, y2 - y1


# -- MOTChallenge sequence folders ---------------------------------------------------------------


@dataclass(frozen=True)
class SeqInfo:
    """A MOTChallenge ``seqinfo.ini``: ``[Sequence]`` name, imDir, frameRate, seqLength, imWidth,
    imHeight, imExt."""

    name: str
    fps: float
    length: int
    width: int
    height: int
    im_dir: str = "img1"
    im_ext: str = ".jpg"


def is_mot_sequence(path: str | Path) -> bool:
    """A folder with a ``seqinfo.ini`` (MOTChallenge sequence layout)."""
    return Path(path).is_dir() and (Path(path) / "seqinfo.ini").is_file()


def read_seqinfo(seq: str | Path) -> SeqInfo:
    """``SEQ/seqinfo.ini`` -> SeqInfo; TrackFileError naming what is missing or wrong."""
    p = Path(seq) / "seqinfo.ini"
    cp = configparser.ConfigParser()
    try:
        cp.read_string(p.read_text())
        sec = cp["Sequence"]
        info = SeqInfo(name=sec.get("name", Path(seq).name), fps=float(sec["frameRate"]), length=int(sec["seqLength"]),
                       width=int(sec["imWidth"]), height=int(sec["imHeight"]), im_dir=sec.get("imDir", "img1"),
                       im_ext=sec.get("imExt", ".jpg"))
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise TrackFileError(f"{p}: cannot read ({e})") from None
    except KeyError as e:
        raise TrackFileError(f"{p}: no {e.args[0]} in [Sequence] (needs frameRate, seqLength, imWidth, imHeight)") from None
    except ValueError as e:
        raise TrackFileError(f"{p}: {e}") from None
    if info.fps <= 0 or info.length <= 0:
        raise TrackFileError(f"{p}: frameRate and seqLength must be positive")
    return info


def sequence_images(seq: str | Path, info: SeqInfo | None = None) -> list[Path]:
    """The frames of a sequence folder in order: ``imDir/000001<imExt>`` ... ``seqLength``."""
    seq = Path(seq)
    info = info or read_seqinfo(seq)
    frames = [seq / info.im_dir / f"{i:06d}{info.im_ext}" for i in range(1, info.length + 1)]
    missing = [f for f in frames if not f.is_file()]
    if missing:
        raise TrackFileError(f"{seq}: {len(missing)} of {info.length} frames missing (first: {missing[0]})")
    return frames


def seqinfo_text(info: SeqInfo) -> str:
    return (f"[Sequence]\nname={info.name}\nimDir={info.im_dir}\nframeRate={info.fps:g}\nseqLength={info.length}\n"
            f"imWidth={info.width}\nimHeight={info.height}\nimExt={info.im_ext}\n")


def gt_lines(frames: Mapping[int, tuple[np.ndarray, np.ndarray]], visibility: Mapping[int, np.ndarray] | None = None,
             cls: int = 1) -> str:
    """Ground truth (0-based frames, xyxy px) as MOTChallenge ``gt.txt`` rows: 1-based frames and
    pixels, consider flag 1, class ``cls`` (1: the scored target class), visibility (default 1)."""
    out = []
    for f, k, i, left, top, w, h in _rows(frames):
        v = float(visibility[f][k]) if visibility and visibility.get(f) is not None else 1.0
        out.append(f"{f + 1},{i},{left:g},{top:g},{w:g},{h:g},1,{cls},{v:.4f}")
    return "\n".join(out) + ("\n" if out else "")


def write_mot_sequence(seq: str | Path, images: Sequence[bytes], truth: Mapping[int, tuple[np.ndarray, np.ndarray]], *,
                       fps: float, size: tuple[int, int], im_ext: str = ".jpg",
                       visibility: Mapping[int, np.ndarray] | None = None) -> SeqInfo:
    """Write a MOTChallenge sequence folder: ``img1/000001<im_ext>`` ... (``images``: each frame's
    encoded file bytes, in order), ``seqinfo.ini`` and ``gt/gt.txt`` (``truth``: 0-based frame ->
    (ids, xyxy boxes)). Files are written atomically."""
    seq = Path(seq)
    info = SeqInfo(name=seq.name, fps=float(fps), length=len(images), width=size[0], height=size[1], im_ext=im_ext)
    (seq / info.im_dir).mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(images, 1):
        atomic_write_text(seq / info.im_dir / f"{i:06d}{im_ext}", data)
    (seq / "gt").mkdir(exist_ok=True)
    atomic_write_text(seq / "gt" / "gt.txt", gt_lines(truth, visibility))
    atomic_write_text(seq / "seqinfo.ini", seqinfo_text(info))
    return info

"""Multi-object tracking over DETR detections: stable ids across frames, ``ddetr video --track``.

One frame goes through three steps::

    detections (score >= low)  -> duplicate suppression   DETR fires twice on one object at low scores
                               -> a ``trackers`` tracker  ByteTrack-style two-stage matching (high/low)
                               -> re-linking              a new track that continues a recently lost one
                                                          takes its id back

``trackers`` (Roboflow) provides the motion models and matching; this module adds what DETR needs:

* DETR has no NMS: the set loss suppresses duplicates at high scores only, and the top-K over
  queries x classes returns one query's box once per class. Both give near-identical boxes that
  would each start a track; a class-agnostic NMS at a high IoU (``nms_iou``) keeps the best.
* Scores are flatter than a YOLO's, so the high/low split of two-stage matching is lower than
  ByteTrack's 0.6 (see ``TrackSettings``; measured in ``benchmarks/bench_track.py``).
* An object that the detector misses for a while, or that passes behind something, comes back as
  a new track of the inner tracker, whose Kalman prediction has drifted. ``Relinker`` gives it
  the id of the lost track whose own motion (fitted on its unoccluded boxes) leads to it.

A track found again after a short miss (``TrackSettings.fill_s``) gets boxes for the frames it
was missed in, interpolated between its two observations (``GapFiller``, ``Tracker.fills``): they
are not detections, and whoever writes them marks them so.

Ids are allocated here, from 1, and never reused. ``Tracker.update`` also reports when ids start
and end (``TrackEvents``), which the video pipeline writes to its JSON lines.

Python API::

    tracker = Tracker(fps=25.0)
    for t, dets in enumerate(detections_per_frame):          # sv.Detections, scores >= settings.low
        out = tracker.update(dets, timestamp=t / 25.0)       # out.tracker_id: (N,) ids, -1 untracked
        print(tracker.events.started, tracker.events.ended)
        for f in tracker.fills:                              # boxes of earlier steps in which an id was missed
            print(f.step, f.track_id, f.xyxy)
    ended = tracker.finish()                                 # ids still alive at the end
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import supervision as sv
from scipy.optimize import linear_sum_assignment

TRACKERS = ("cbiou", "bytetrack", "ocsort", "botsort", "sort")
# re-linking: a new track seen as a class the lost one was not costs this many object sizes, as
# much as the base gate: only a close match after a long gap may change class (measured on
# bench_track.py's clips and on ground-truth boxes, where a lighter 0.5 let objects swap ids)
CLASS_CHANGE_COST = 2.0


@dataclass(frozen=True)
class TrackSettings:
    """How detections become tracks. Defaults measured on the demo model (``bench_track.py``).

    ``high``: detections at or above it start tracks and are matched first; ``low``: detections
    from ``low`` up to ``high`` only continue existing tracks (ByteTrack's second stage); below
    ``low`` the tracker never sees them. ``nms_iou``: two boxes overlapping more than this are one
    object (the better-scored is kept). ``lost_s``: how long the inner tracker coasts a missed
    track; ``relink_s``: how long an id stays claimable by a new track (``Relinker``; an id ends
    when both have passed); ``gate``:
    how far (in object sizes) a new track may start from where the lost one was heading.
    ``min_frames``: consecutive matches before a track gets an id. ``fill_s``: a track found
    again after a miss of at most this long gets boxes for the frames it was missed in, linearly
    interpolated between the two observations (``Tracker.fills``; 0 turns it off). They are
    marked as interpolated wherever they are written, and are not detections.
    """

    tracker: str = "cbiou"
    high: float = 0.5
    low: float = 0.1
    nms_iou: float = 0.7
    lost_s: float = 1.0
    relink_s: float = 2.0
    gate: float = 2.0
    min_frames: int = 1
    fill_s: float = 2.0

    def __post_init__(self) -> None:
        if self.tracker not in TRACKERS:
            raise ValueError(f"unknown tracker {self.tracker!r}; choose from {', '.join(TRACKERS)}")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"track thresholds need 0 <= low <= high <= 1, got low {self.low}, high {self.high}")
        if self.min_frames < 1 or self.lost_s < 0 or self.relink_s < 0 or self.gate < 0 or self.fill_s < 0:
            raise ValueError("min_frames >= 1, lost_s, relink_s, gate and fill_s >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def track_thresholds(cfg: Any, high: float | None = None, low: float | None = None) -> tuple[float, float]:
    """(high, low) for a model: as given, else the model's own measured thresholds
    (``ModelConfig.track_high`` / ``track_low``, from its weights' metadata), else
    ``TrackSettings``' defaults. ``cfg`` may be None (no model)."""
    d = TrackSettings()
    card_high, card_low = getattr(cfg, "track_high", None), getattr(cfg, "track_low", None)
    high = high if high is not None else card_high if card_high is not None else d.high
    low = low if low is not None else card_low if card_low is not None else d.low
    return float(high), float(low)


def settings_for(cfg: Any, high: float | None = None, low: float | None = None, **kw: Any) -> TrackSettings:
    """``TrackSettings`` with ``track_thresholds(cfg, high, low)`` and the other fields ``kw``."""
    high, low = track_thresholds(cfg, high, low)
    return TrackSettings(high=high, low=low, **kw)


def make_tracker(settings: TrackSettings, fps: float):
    """The ``trackers`` tracker ``settings.tracker``, set up with the settings' thresholds."""
    import trackers as T

    lost = max(1, int(round(settings.lost_s * 30)))  # trackers counts the buffer in 30 FPS frames
    common = dict(lost_track_buffer=lost, frame_rate=fps, minimum_consecutive_frames=settings.min_frames)
    if settings.tracker == "bytetrack":
        return T.ByteTrackTracker(**common, track_activation_threshold=settings.high, high_conf_det_threshold=settings.high,
                                  minimum_iou_threshold=0.1)
    if settings.tracker in ("cbiou", "botsort"):
        # both run their own two-stage (high, then low) matching; botsort adds camera-motion
        # compensation from the frame (sparse optical flow), cbiou buffered IoU for fast motion
        kw = dict(common, track_activation_threshold=settings.high, high_conf_det_threshold=settings.high)
        if settings.tracker == "cbiou":
            return T.CBIoUTracker(**kw)
        return T.BoTSORTTracker(**kw)
    if settings.tracker == "ocsort":  # no low stage: it matches detections >= high only
        return T.OCSORTTracker(**common, high_conf_det_threshold=settings.high, minimum_iou_threshold=0.1)
    return T.SORTTracker(**common, track_activation_threshold=settings.high, minimum_iou_threshold=0.1)


def suppress_duplicates(xyxy: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Class-agnostic greedy NMS: indices (best score first) of the boxes kept from (N, 4) xyxy
    ``xyxy`` and (N,) ``scores``; a box overlapping a better one by more than ``iou`` goes."""
    n = len(scores)
    if n == 0 or iou >= 1.0:
        return np.arange(n)
    order = np.argsort(-scores, kind="stable")
    b = xyxy[order].astype(np.float64)
    area = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lt = np.maximum(b[:, None, :2], b[None, :, :2])
    rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clip(0).prod(-1)
    ious = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)
    keep = np.ones(n, bool)
    for i in range(n):
        if keep[i]:
            keep[i + 1 :] &= ious[i, i + 1 :] <= iou
    return order[keep]


class Relinker:
    """Maps the inner tracker's ids to the ids we publish, and hands a lost id back to the new
    track that continues it.

    Each published id keeps its recent boxes (time, centre, size). When the inner tracker confirms
    a new track, the ids not seen this frame and lost for at most ``max_gap_s`` are candidates;
    each predicts where its object is now from the velocity of its *full-size* boxes (a box that
    shrinks is being occluded, and its centre slows down with it) and the last of them. A new track
    whose centre lies within ``gate + 0.25 * sqrt(missed frames)`` sizes of a prediction (a class
    the lost track was not seen as costs ``CLASS_CHANGE_COST`` sizes; sizes within x0.25..x2) takes
    the best such id (Hungarian).
    Ids come from one counter and are never given out twice.
    """

    def __init__(self, fps: float, max_gap_s: float = 2.0, gate: float = 2.0, frame_size: tuple[int, int] | None = None,
                 history: int = 15, keep_s: float | None = None) -> None:
        self.fps, self.max_gap_s, self.gate, self.frame_size = fps, max_gap_s, gate, frame_size
        # an id lives while it may be re-linked or its inner track may still come back by itself
        self.keep_s = max(max_gap_s, keep_s or 0.0)
        self.history = history
        self._inner: dict[int, int] = {}  # inner tracker id -> published id
        self._obs: dict[int, deque] = {}  # published id -> (t, cx, cy, w, h) rows, oldest first
        self._cls: dict[int, deque] = {}  # published id -> its recent classes
        self._next = 1

    def _predict(self, oid: int, t: float) -> tuple[float, float, float, float, float]:
        """(cx, cy, w, h, time last seen) of ``oid`` extrapolated to ``t``."""
        a = np.asarray(self._obs[oid], np.float64)
        size = np.sqrt(a[:, 3] * a[:, 4])
        full = a[size >= 0.8 * size.max()]
        last = full[-1]
        v = np.zeros(2)
        if len(full) >= 2 and np.ptp(full[:, 0]) > 0:
            v = np.polyfit(full[:, 0] - last[0], full[:, 1:3], 1)[0]
        cx, cy = last[1:3] + v * (t - last[0])
        if self.frame_size is not None:  # objects leave or stop at the edges, they are not found beyond them
            cx, cy = min(max(cx, 0.0), self.frame_size[0]), min(max(cy, 0.0), self.frame_size[1])
        return float(cx), float(cy), float(last[3]), float(last[4]), float(a[-1, 0])

    def _classes(self, oid: int) -> set[int]:
        """The classes ``oid`` was seen as, leaving out one-off flickers (< 30% of the most frequent)."""
        counts = Counter(self._cls[oid])
        top = max(counts.values())
        return {k for k, v in counts.items() if v >= 0.3 * top}

    def _claim(self, new: list[int], rows: dict[int, int], xyxy: np.ndarray, cls: np.ndarray, t: float,
               taken: set[int]) -> dict[int, int]:
        """New inner ids -> lost published ids they continue."""
        cands = [o for o in self._obs if o not in taken and t - self._obs[o][-1][0] <= self.max_gap_s]
        if not cands:
            return {}
        cost = np.full((len(new), len(cands)), np.inf)
        preds = [self._predict(o, t) for o in cands]
        classes = [self._classes(o) for o in cands]
        for a, n in enumerate(new):
            x1, y1, x2, y2 = (float(v) for v in xyxy[rows[n]])
            cx, cy, s = (x1 + x2) / 2, (y1 + y2) / 2, np.sqrt(max(x2 - x1, 0) * max(y2 - y1, 0))
            for c, (px, py, pw, ph, seen) in enumerate(preds):
                ps = max(np.sqrt(pw * ph), 1e-6)
                if not 0.25 <= s / ps <= 2.0:
                    continue
                other_class = int(cls[rows[n]]) not in classes[c]
                d = np.hypot(cx - px, cy - py) / ps + CLASS_CHANGE_COST * other_class
                if d <= self.gate + 0.25 * np.sqrt(max(t - seen, 0.0) * self.fps):
                    cost[a, c] = d
        if not np.isfinite(cost).any():
            return {}
        r, c = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e9))
        return {new[i]: cands[j] for i, j in zip(r, c) if np.isfinite(cost[i, j])}

    def update(self, inner_ids: np.ndarray, xyxy: np.ndarray, cls: np.ndarray, t: float) -> np.ndarray:
        """(N,) inner ids (-1: untracked), (N, 4) boxes, (N,) classes at time ``t`` -> (N,) published ids."""
        rows = {int(i): k for k, i in enumerate(inner_ids) if i >= 0}
        taken = {self._inner[i] for i in rows if i in self._inner}
        new = sorted(i for i in rows if i not in self._inner)
        if new:
            claimed = self._claim(new, rows, xyxy, cls, t, taken)
            for n in new:
                if n in claimed:
                    oid = claimed[n]
                    # the id moves to the new track; its old inner track, should it come back, is another object
                    self._inner = {i: o for i, o in self._inner.items() if o != oid}
                else:
                    oid, self._next = self._next, self._next + 1
                self._inner[n] = oid
        out = np.full(len(inner_ids), -1, dtype=int)
        for i, k in rows.items():
            oid = self._inner[i]
            out[k] = oid
            x1, y1, x2, y2 = (float(v) for v in xyxy[k])
            self._obs.setdefault(oid, deque(maxlen=self.history)).append((t, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1))
            self._cls.setdefault(oid, deque(maxlen=self.history)).append(int(cls[k]))
        return out

    def expire(self, t: float) -> list[int]:
        """Forget ids lost for longer than ``keep_s`` (they can no longer come back); returns them."""
        gone = [o for o, h in self._obs.items() if t - h[-1][0] > self.keep_s]
        for o in gone:
            del self._obs[o], self._cls[o]
        if gone:
            self._inner = {i: o for i, o in self._inner.items() if o not in gone}
        return gone

    def alive(self) -> list[int]:
        return sorted(self._obs)


@dataclass(frozen=True)
class Fill:
    """A box for a frame in which track ``track_id`` was missed, interpolated afterwards: ``step``
    is the ``Tracker.update`` call (0-based) it belongs to, ``xyxy`` (4,) px, ``class_id`` the
    track's class when it was last seen. ``replaces``: the track had a weak box there (scored
    below ``high``) that does not fit its motion; the fill takes the id from it."""

    step: int
    track_id: int
    xyxy: np.ndarray
    class_id: int
    replaces: bool = False


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (4,) xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + max(b[2] - b[0], 0) * max(b[3] - b[1], 0) - inter
    return float(inter / union) if union > 0 else 0.0


class GapFiller:
    """Linear interpolation of short gaps in published tracks (what ByteTrack and OC-SORT do
    offline), done online with a bounded look-back.

    Each id keeps its last observation and its last *confident* one (score >= ``high``), each
    as (step, time, box, class). When an id is seen confidently again within ``max_gap_s`` seconds
    of its last confident box, the steps in between are interpolated by time between the two
    (dropped frames and strides keep their true spacing): a step without a box of the id gets
    the interpolated box; a step where only a weak box (score < ``high``, ByteTrack's second stage)
    continued the track gets it too when that box does not fit (IoU < ``fit_iou`` with the
    interpolation: a partial view of an occluded object, or a neighbour's box), and the weak box
    loses the id. An id that has no confident box within ``max_gap_s`` is interpolated between
    its plain observations (gaps only).
    ``hold_from`` tells a writer which steps may still change: those after the anchor of an id
    whose latest boxes are missing or weak and that can still be resolved in time, so at most
    ``max_gap_s`` worth of frames ever wait.
    """

    def __init__(self, max_gap_s: float, high: float = 0.5, fit_iou: float = 0.5) -> None:
        self.max_gap_s, self.high, self.fit_iou = max_gap_s, high, fit_iou
        self._last: dict[int, tuple[int, float, np.ndarray, int]] = {}  # id -> (step, t, xyxy, class)
        self._anchor: dict[int, tuple[int, float, np.ndarray, int]] = {}  # id -> last confident observation
        self._weak: dict[int, dict[int, np.ndarray]] = {}  # id -> {step: weak box} since its anchor
        self._times: deque[tuple[int, float]] = deque()  # (step, t) of the recent steps
        self._step = -1

    def _fresh(self, obs: tuple[int, float, np.ndarray, int] | None, t: float) -> bool:
        return obs is not None and t - obs[1] <= self.max_gap_s + 1e-9

    def _fills(self, i: int, a: tuple[int, float, np.ndarray, int], step: int, t: float, b: np.ndarray) -> list[Fill]:
        s0, t0, b0, c0 = a
        weak = self._weak.get(i, {})
        out = []
        for s, ts in self._times:
            if s0 < s < step:
                f = (ts - t0) / (t - t0) if t > t0 else (s - s0) / (step - s0)
                box = (1 - f) * b0 + f * b
                w = weak.get(s)
                if w is None:
                    out.append(Fill(s, i, box, c0))
                elif box_iou(w, box) < self.fit_iou:
                    out.append(Fill(s, i, box, c0, replaces=True))
        return out

    def update(self, step: int, t: float, ids: np.ndarray, xyxy: np.ndarray, cls: np.ndarray,
               scores: np.ndarray | None = None) -> list[Fill]:
        """Step ``step`` at time ``t`` with (N,) published ids (-1: none), (N, 4) boxes, (N,)
        classes, (N,) scores -> the fills of earlier steps of the ids seen now."""
        self._step = step
        fills: list[Fill] = []
        if self.max_gap_s <= 0:
            return fills
        self._times.append((step, t))
        while self._times and t - self._times[0][1] > self.max_gap_s + 1e-9:
            self._times.popleft()
        for k, (i, b, c) in enumerate(zip(ids, xyxy, cls)):
            i = int(i)
            if i < 0:
                continue
            b = np.asarray(b, np.float64)
            obs = (step, t, b, int(c))
            confident = scores is None or float(scores[k]) >= self.high
            anchor = self._anchor.get(i)
            if confident:
                a = anchor if self._fresh(anchor, t) else self._last.get(i)
                if self._fresh(a, t) and step - a[0] > 1:
                    fills += self._fills(i, a, step, t, b)
                self._anchor[i] = obs
                self._weak.pop(i, None)
            elif self._fresh(anchor, t):
                self._weak.setdefault(i, {})[step] = b  # decided when the next confident box comes
            else:
                last = self._last.get(i)
                if self._fresh(last, t) and step - last[0] > 1:
                    fills += self._fills(i, last, step, t, b)
            self._last[i] = obs
        for i in [i for i, v in self._last.items() if not self._fresh(v, t)]:
            del self._last[i]  # lost for too long: nothing of it can be filled any more
        for i in [i for i, v in self._anchor.items() if not self._fresh(v, t)]:
            del self._anchor[i]
            self._weak.pop(i, None)
        return fills

    def forget(self, ids: list[int]) -> None:
        """Ids that ended (they never come back): nothing waits for them any more."""
        for i in ids:
            self._last.pop(i, None)
            self._anchor.pop(i, None)
            self._weak.pop(i, None)

    def hold_from(self) -> int:
        """The first step that a later ``update`` may still fill (the current step + 1 when none)."""
        waiting = [a[0] + 1 for a in self._anchor.values() if a[0] < self._step]
        waiting += [v[0] + 1 for i, v in self._last.items() if v[0] < self._step and i not in self._anchor]
        return min(waiting, default=self._step + 1)


@dataclass
class TrackEvents:
    """What changed at the last ``Tracker.update``: ids seen for the first time, and ids given up
    (lost for longer than ``relink_s`` and ``lost_s``: they will not come back)."""

    started: list[int] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)


class Tracker:
    """Stable ids over sv.Detections: duplicate suppression, a ``trackers`` tracker, re-linking.

    ``update`` takes one frame's detections (those scoring >= ``settings.low`` go to the tracker)
    and returns them without duplicates, possibly reordered, with ``tracker_id`` (N,) set: the
    published id, or -1 for a detection no confirmed track holds (always for scores < ``low``).
    Timestamps (seconds) let the motion model step over dropped frames correctly.
    """

    def __init__(self, fps: float = 30.0, settings: TrackSettings | None = None, frame_size: tuple[int, int] | None = None) -> None:
        self.settings = settings or TrackSettings()
        self.fps = fps
        self._inner = make_tracker(self.settings, fps)
        self._relink = Relinker(fps, self.settings.relink_s, self.settings.gate, frame_size, keep_s=self.settings.lost_s)
        self._fill = GapFiller(self.settings.fill_s, self.settings.high)
        self._seen: set[int] = set()
        self.events = TrackEvents()
        self.fills: list[Fill] = []
        self._frame = 0

    def update(self, dets: sv.Detections, timestamp: float | None = None, frame: np.ndarray | None = None) -> sv.Detections:
        """``frame`` (H, W, 3) BGR is used by ``botsort`` only (camera-motion compensation)."""
        s = self.settings
        t = self._frame / self.fps if timestamp is None else float(timestamp)
        step = self._frame
        self._frame += 1
        scores = dets.confidence if dets.confidence is not None else np.ones(len(dets), np.float32)
        dets = dets[suppress_duplicates(dets.xyxy, scores, s.nms_iou)]
        scores = dets.confidence if dets.confidence is not None else np.ones(len(dets), np.float32)
        weak = dets[scores < s.low]  # not for the tracker; still drawn if the caller's --conf is lower
        dets = dets[scores >= s.low]
        if s.tracker == "botsort":
            out = self._inner.update(dets, frame=frame, timestamp=timestamp)
        else:
            out = self._inner.update(dets, timestamp=timestamp)
        if len(weak):
            weak.tracker_id = np.full(len(weak), -1, dtype=int)
            out = sv.Detections.merge([out, weak]) if len(out) else weak
        inner = out.tracker_id if out.tracker_id is not None else np.full(len(out), -1, dtype=int)
        cls = out.class_id if out.class_id is not None else np.zeros(len(out), dtype=int)
        out.tracker_id = self._relink.update(np.asarray(inner, dtype=int), out.xyxy, cls, t)
        started = sorted({int(i) for i in out.tracker_id if i >= 0} - self._seen)
        self._seen.update(started)
        self.events = TrackEvents(started, sorted(self._relink.expire(t)))
        self.fills = self._fill.update(step, t, out.tracker_id, out.xyxy, cls, out.confidence)
        self._fill.forget(self.events.ended)
        return out

    def hold_from(self) -> int:
        """The first ``update`` step (0-based) that a later update may still add ``fills`` to:
        output of earlier steps is final."""
        return self._fill.hold_from()

    def finish(self) -> list[int]:
        """End of the stream: the ids not ended yet."""
        return self._relink.alive()

    def reset(self) -> None:
        self.__init__(self.fps, self.settings, self._relink.frame_size)  # type: ignore[misc]


def tracked_output(dets: sv.Detections, conf: float) -> sv.Detections:
    """What a tracked frame draws and saves: every detection a track holds (a low-score box that
    continues a track is the point of two-stage matching), and untracked ones scoring >= ``conf``."""
    if len(dets) == 0:
        return dets
    tid = dets.tracker_id if dets.tracker_id is not None else np.full(len(dets), -1)
    scores = dets.confidence if dets.confidence is not None else np.ones(len(dets))
    return dets[(tid >= 0) | (scores >= conf)]

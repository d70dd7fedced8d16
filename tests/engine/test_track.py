"""Tracking: the metrics against motmetrics (an independent implementation), the tracker on
generated clips (ids through misses, never reused, duplicates), the start/end events of the
video JSON lines, and ``ddetr eval --track`` on the bundled clip with the demo model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import motmetrics as mm
import numpy as np
import pytest
import supervision as sv
from typer.testing import CliRunner

from ddetr_cli.cli.main import app
from ddetr_cli.data import synth
from ddetr_cli.engine.track import Tracker, TrackSettings, suppress_duplicates, tracked_output
from ddetr_cli.engine.track_eval import score_tracks
from ddetr_cli.engine.video import run_video
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.mot import TrackFrames, read_video_jsonl

ROOT = Path(__file__).resolve().parents[2]


def truth_frames(truth: list[dict]) -> TrackFrames:
    return TrackFrames({t["frame"]: (t["ids"], t["boxes"].astype(np.float64)) for t in truth}, processed={t["frame"] for t in truth})


def motmetrics_scores(truth: TrackFrames, tracks: TrackFrames) -> dict:
    """The same scores by motmetrics: IoU >= 0.5 matches (its iou_matrix uses np.asfarray, gone in
    NumPy 2, so the distances are computed here: 1 - IoU, NaN below 0.5)."""
    acc = mm.MOTAccumulator(auto_id=False)
    for f in sorted(truth.processed):
        gi, gb = truth.get(f)
        ti, tb = tracks.get(f)
        d = np.full((len(gb), len(tb)), np.nan)
        for a, g in enumerate(gb):
            for b, p in enumerate(tb):
                iw = max(0.0, min(g[2], p[2]) - max(g[0], p[0]))
                ih = max(0.0, min(g[3], p[3]) - max(g[1], p[1]))
                inter = iw * ih
                iou = inter / ((g[2] - g[0]) * (g[3] - g[1]) + (p[2] - p[0]) * (p[3] - p[1]) - inter)
                if iou >= 0.5:
                    d[a, b] = 1 - iou
        acc.update(list(gi), list(ti), d, frameid=f)
    names = ["idf1", "mota", "num_switches", "mostly_tracked", "num_false_positives", "num_misses", "num_fragmentations"]
    row = mm.metrics.create().compute(acc, metrics=names, name="x").iloc[0]
    return {k: float(row[k]) for k in names}


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return synth.make_clip(tmp_path_factory.mktemp("crowd") / "crowd.mp4", frames=30, size=(320, 240), fps=15, seed=4, scene="crowd")


def perturbed(truth: list[dict], kind: str, seed: int = 0) -> TrackFrames:
    """Tracks made from the ground truth by a known kind of mistake."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in truth:
        ids, boxes = t["ids"].copy() + 100, t["boxes"].astype(np.float64).copy()
        if kind == "noisy":  # misses, jitter, a false box now and then, one id swap half-way
            keep = rng.random(len(ids)) > 0.15
            ids, boxes = ids[keep], boxes[keep] + rng.normal(0, 2.0, boxes[keep].shape)
            if t["frame"] >= 15:
                ids = np.where(ids == 100, 101, np.where(ids == 101, 100, ids))
            if rng.random() < 0.3:
                ids, boxes = np.append(ids, 999), np.vstack([boxes, [[0, 0, 20, 20]]])
        elif kind == "shuffled":  # right boxes, ids dealt at random every frame
            ids = rng.permutation(ids + 7 * t["frame"]) % 13
        out[t["frame"]] = (ids, boxes)
    return TrackFrames(out, processed={t["frame"] for t in truth})


@pytest.mark.parametrize("kind", ["perfect", "noisy", "shuffled"])
def test_scores_match_motmetrics(crowd: list[dict], kind: str) -> None:
    truth = truth_frames(crowd)
    ours = score_tracks(truth, perturbed(crowd, kind))
    ref = motmetrics_scores(truth, perturbed(crowd, kind))
    assert ours["IDF1"] == pytest.approx(ref["idf1"], abs=1e-9)
    assert ours["MOTA"] == pytest.approx(ref["mota"], abs=1e-9)
    assert (ours["IDSW"], ours["MT"], ours["FP"], ours["FN"]) == \
        (ref["num_switches"], ref["mostly_tracked"], ref["num_false_positives"], ref["num_misses"])
    # TrackEval counts a restart after the object's own absence (hidden below MIN_VISIBLE) as a
    # fragmentation too, motmetrics only a gap in the frames it is present in
    assert ours["Frag"] >= ref["num_fragmentations"]
    if kind == "perfect":
        assert ours["IDF1"] == ours["MOTA"] == pytest.approx(1.0) and ours["HOTA"] > 0.99 and ours["IDSW"] == 0
    if kind == "noisy":
        assert ours["IDSW"] >= 2 and 0.5 < ours["IDF1"] < 0.95
    if kind == "shuffled":  # every box is right, the ids are not: identity metrics must see it
        assert ours["IDF1"] < 0.4 and ours["IDSW"] > 50 and ours["MOTA"] < 0.5 and ours["HOTA"] < 0.6


def detections(t: dict, rng: np.random.Generator, miss: float = 0.1, dup: bool = True, hide: Sequence[int] = ()) -> sv.Detections:
    """DETR-like detections of a frame's ground truth: misses, a second slightly shifted box per
    object at a lower score (DETR's duplicates), objects in ``hide`` not detected at all."""
    b, n = t["boxes"].astype(np.float32), len(t["boxes"])
    keep = (rng.random(n) > miss) & ~np.isin(t["ids"], list(hide))
    score = rng.uniform(0.5, 0.95, n).astype(np.float32)
    parts = [(b, score)] + ([(b + rng.normal(0, 1.0, b.shape).astype(np.float32), score * 0.9)] if dup else [])
    return sv.Detections(xyxy=np.concatenate([p[0][keep] for p in parts]), confidence=np.concatenate([p[1][keep] for p in parts]),
                         class_id=np.concatenate([t["labels"][keep]] * len(parts)),
                         data={"gt": np.concatenate([t["ids"][keep]] * len(parts))})


def run_tracker(truth: list[dict], fps: float, settings: TrackSettings | None = None, **kw) -> tuple[TrackFrames, list[sv.Detections]]:
    rng = np.random.default_rng(0)
    tracker = Tracker(fps=fps, settings=settings)
    out, frames = {}, []
    for t in truth:
        d = tracked_output(tracker.update(detections(t, rng, **kw), timestamp=t["frame"] / fps), 0.3)
        frames.append(d)
        ok = d.tracker_id >= 0
        out[t["frame"]] = (d.tracker_id[ok], d.xyxy[ok].astype(np.float64))
    return TrackFrames(out, processed=set(out)), frames


@pytest.mark.parametrize("scene", ["lines", "crossing", "occluder", "dropped"])
def test_tracker_on_generated_clips(tmp_path: Path, scene: str) -> None:
    truth = synth.make_clip(tmp_path / f"{scene}.mp4", frames=40, size=(320, 240), fps=15, seed=1, scene=scene)
    gt = truth_frames(truth)
    tracks, _ = run_tracker(truth, 15.0)
    ref = motmetrics_scores(gt, tracks)
    assert ref["num_switches"] == 0 and ref["idf1"] > 0.9, ref
    assert score_tracks(gt, tracks)["tracks"] == len(gt.ids)  # one id per object
    # what DETR's duplicates do without suppression: extra tracks, many switches
    dup = score_tracks(gt, run_tracker(truth, 15.0, TrackSettings(nms_iou=1.0))[0])
    assert dup["tracks"] > len(gt.ids) and dup["IDF1"] < 0.8


def test_ids_survive_a_miss_and_are_never_reused(tmp_path: Path) -> None:
    truth = synth.make_clip(tmp_path / "lines.mp4", frames=60, size=(320, 240), fps=15, seed=0)
    # object 0 is not detected for frames 20-31 (0.8 s): it must come back with its id
    hidden = [dict(t, hide=(0,) if 20 <= t["frame"] < 32 else ()) for t in truth]
    rng = np.random.default_rng(1)
    tracker = Tracker(fps=15.0)
    ids_of: dict[int, set[int]] = {}
    started: list[int] = []
    for t in hidden:
        d = tracker.update(detections(t, rng, miss=0.0, hide=t["hide"]), timestamp=t["frame"] / 15)
        started += tracker.events.started
        assert not tracker.events.ended
        for g, i in zip(d.data["gt"], d.tracker_id):
            if i >= 0:
                ids_of.setdefault(int(g), set()).add(int(i))
    assert all(len(v) == 1 for v in ids_of.values()), ids_of
    assert sorted(started) == sorted(next(iter(v)) for v in ids_of.values()) and len(set(started)) == len(started)
    assert sorted(tracker.finish()) == sorted(started)

    # a miss longer than relink_s ends the id; the object comes back under a new one
    tracker = Tracker(fps=15.0, settings=TrackSettings(relink_s=0.5, lost_s=0.3))
    seen: list[int] = []
    ended: list[int] = []
    for t in hidden:
        d = tracker.update(detections(t, rng, miss=0.0, dup=False, hide=t["hide"]), timestamp=t["frame"] / 15)
        ended += tracker.events.ended
        seen += [int(i) for g, i in zip(d.data["gt"], d.tracker_id) if g == 0 and i >= 0 and int(i) not in seen]
    assert len(seen) == 2 and seen[0] in ended and seen[1] > max(i for v in ids_of.values() for i in v)


def test_suppress_duplicates_keeps_the_best_of_each_group() -> None:
    boxes = np.array([[0, 0, 10, 10], [0.5, 0, 10.5, 10], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.5, 0.9, 0.8, 0.4], np.float32)
    assert suppress_duplicates(boxes, scores, 0.7).tolist() == [1, 2]
    assert sorted(suppress_duplicates(boxes, scores, 1.0).tolist()) == [0, 1, 2, 3]


class Flicker:
    """A detector stand-in: one square, missed for frames 6-17 of a 12 fps clip (1 s)."""

    labels = LabelTable.from_names(["square"])

    def __init__(self) -> None:
        self.n = 0
        self.confs: list[float] = []

    def predict_arrays(self, images, conf=0.3, max_det=100, classes=None):
        self.confs.append(conf)
        out = []
        for im in images:
            h, w = im.shape[:2]
            x = 10 + 2 * self.n
            box = np.array([[x, 10, x + 30, 40]], np.float32) if not 6 <= self.n < 18 else np.zeros((0, 4), np.float32)
            # a low score that only continues the track (between low 0.1 and high 0.5) half the time
            score = np.full(len(box), 0.9 if self.n % 2 == 0 else 0.2, np.float32)
            out.append(sv.Detections(xyxy=box, confidence=score, class_id=np.zeros(len(box), int)))
            self.n += 1
        return out


def test_video_jsonl_says_when_tracks_start_and_end(tmp_path: Path) -> None:
    src = tmp_path / "c.mp4"
    synth.make_clip(src, frames=30, size=(96, 64), fps=12, seed=1)
    det = Flicker()
    res = run_video(det, src, tmp_path / "run", save_json=True, track=True, conf=0.3,
                    track_settings=TrackSettings(relink_s=0.5, lost_s=0.3), handle_signals=False)
    assert min(det.confs) == pytest.approx(0.1)  # the tracker was given detections down to its low threshold
    recs = [json.loads(line) for line in Path(res.outputs["jsonl"]).read_text().splitlines()]
    assert [r["frame"] for r in recs] == list(range(30))
    events = [(r["frame"], e) for r in recs for e in r["track_events"]]
    assert events == [(0, {"id": 1, "event": "start"}),
                      (12, {"id": 1, "event": "end", "last_frame": 5}),  # lost at 6, given up 0.5 s later
                      (19, {"id": 2, "event": "start"}),  # a new track (after the first frame) is confirmed by its second box
                      (29, {"id": 2, "event": "end", "last_frame": 29})]
    ids = [d["track_id"] for r in recs for d in r["detections"]]
    # score-0.2 boxes are kept (they continue a track) though --conf is 0.3; frame 18's box is drawn, without an id
    assert ids == [1] * 6 + [None] + [2] * 11
    assert res.tracks == 2
    assert read_video_jsonl(res.outputs["jsonl"]).processed == set(range(30))


@pytest.mark.slow
def test_eval_track_bundled_clip_with_demo_model(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    r = CliRunner().invoke(app, ["eval", str(ROOT / "examples" / "clip.mp4"), "--track", "--model", "demo", "--device", "cpu",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout[r.stdout.index("{"):])["metrics"]
    assert m["IDF1"] >= 0.9 and m["IDSW"] == 0 and m["tracks"] == m["objects"] == 5, m
    # every object mostly tracked: the detector misses two of them for up to a second under the
    # others, and the interpolated boxes of those gaps (marked as such) carry them over 80%
    assert m["MT"] == 5, m
    lines = [json.loads(x) for x in (out / "clip.jsonl").read_text().splitlines()]
    filled = [d for x in lines for d in x["detections"] if d.get("interpolated")]
    assert filled and all(d["score"] is None and d["track_id"] is not None for d in filled)
    # the same numbers from motmetrics, on the run's own JSON lines
    from ddetr_cli.formats.mot import read_truth

    ref = motmetrics_scores(read_truth(ROOT / "examples" / "clip.json"), read_video_jsonl(out / "clip.jsonl"))
    assert ref["idf1"] == pytest.approx(m["IDF1"], abs=1e-9) and ref["num_switches"] == 0
    # and scoring the JSON lines again from the command line gives them too
    r2 = CliRunner().invoke(app, ["eval", str(out / "clip.jsonl"), "--track", "--gt", str(ROOT / "examples" / "clip.json"), "--json"])
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout[r2.stdout.index("{"):])["metrics"] == m


def square(f: int) -> np.ndarray:
    """The box of a square moving 3 px right per frame, (4,) xyxy."""
    return np.array([10 + 3 * f, 20, 40 + 3 * f, 50], np.float32)


def one_box(f: int, missed: bool) -> sv.Detections:
    box = np.zeros((0, 4), np.float32) if missed else square(f)[None]
    return sv.Detections(xyxy=box, confidence=np.full(len(box), 0.9, np.float32), class_id=np.zeros(len(box), int))


def test_gap_filler_interpolates_between_the_two_observations() -> None:
    # missed for frames 5-8 at 12 fps (0.33 s), found again at 9: the four frames get the straight-line boxes
    tracker = Tracker(fps=12.0, settings=TrackSettings(fill_s=0.5))
    fills, holds, ids = [], [], set()
    for f in range(16):
        out = tracker.update(one_box(f, 5 <= f < 9), timestamp=f / 12)
        ids.update(int(i) for i in out.tracker_id)
        fills += tracker.fills
        holds.append(tracker.hold_from())
    assert ids == {1}
    assert [x.step for x in fills] == [5, 6, 7, 8] and {x.track_id for x in fills} == {1}
    for x in fills:
        np.testing.assert_allclose(x.xyxy, square(x.step), atol=1e-4)
    # while the square is missing, output from frame 5 on may still be filled; once it is back, nothing waits
    assert holds[:5] == [1, 2, 3, 4, 5] and holds[5:9] == [5] * 4 and holds[9:] == list(range(10, 17))

    # dropped frames: timestamps, not steps, place the boxes (frames 6-8 of a stream that lost 5 and 7)
    tracker = Tracker(fps=12.0, settings=TrackSettings(fill_s=0.5))
    times = [0, 1, 2, 3, 4, 6, 8, 9, 10]
    got = []
    for step, f in enumerate(times):
        tracker.update(one_box(f, f in (6, 8)), timestamp=f / 12)
        got += [(times[x.step], x.xyxy) for x in tracker.fills]
    assert [g[0] for g in got] == [6, 8]
    for f, b in got:
        np.testing.assert_allclose(b, square(f), atol=1e-4)

    # weak boxes (below high, kept by the second stage) between confident ones: one on the square's
    # line stays, one that does not fit its motion (a partial view, a neighbour's box) is replaced
    tracker = Tracker(fps=12.0, settings=TrackSettings(fill_s=0.5, high=0.5, low=0.1))
    fills = []
    for f in range(12):
        d = one_box(f, False)
        if f in (5, 6):
            d.confidence[:] = 0.3
        if f == 6:
            d.xyxy[0] += np.array([12, 0, 0, 0], np.float32)  # the left part is hidden: IoU 0.6 with the square
        if f == 7:
            d.confidence[:] = 0.3
            d.xyxy[0] = square(f) + np.array([17, 0, 0, 0], np.float32)  # IoU 0.43: most of it hidden
        out = tracker.update(d, timestamp=f / 12)
        assert list(out.tracker_id) == [1]
        fills += tracker.fills
    assert [(x.step, x.replaces) for x in fills] == [(7, True)]
    np.testing.assert_allclose(fills[0].xyxy, square(7), atol=1e-4)

    # a miss longer than fill_s is not filled (the id survives it), and nothing waits for it any more
    for fill_s in (0.25, 0.0):
        tracker = Tracker(fps=12.0, settings=TrackSettings(fill_s=fill_s))
        fills, ids = [], set()
        for f in range(16):
            out = tracker.update(one_box(f, 5 <= f < 9), timestamp=f / 12)
            ids.update(int(i) for i in out.tracker_id)
            fills += tracker.fills
            assert tracker.hold_from() >= f + 1 - (3 if fill_s else 0)
        assert not fills and ids == {1} and tracker.hold_from() == 16


class Mover:
    """A detector stand-in: ``square``, missed in the frames of ``miss``."""

    labels = LabelTable.from_names(["square"])

    def __init__(self, miss: range) -> None:
        self.n, self.miss = 0, miss

    def predict_arrays(self, images, conf=0.3, max_det=100, classes=None):
        out = []
        for _ in images:
            out.append(one_box(self.n, self.n in self.miss))
            self.n += 1
        return out


@pytest.mark.parametrize("miss, fill_s", [(range(6, 10), 1.0), (range(6, 10), 0.0), (range(6, 30), 1.0)])
def test_video_jsonl_marks_interpolated_boxes_and_waits_boundedly(tmp_path: Path, miss: range, fill_s: float) -> None:
    src = tmp_path / "c.mp4"
    synth.make_clip(src, frames=30, size=(96, 64), fps=12, seed=1)
    jsonl = tmp_path / "run" / "c.jsonl"
    lags = []

    def on_frame(fr) -> None:  # lines on disk vs frames processed, while the run goes on
        lags.append(fr.frame.index + 1 - len(jsonl.read_text().splitlines()))

    res = run_video(Mover(miss), src, tmp_path / "run", save_json=True, track=True, conf=0.3, on_frame=on_frame,
                    track_settings=TrackSettings(fill_s=fill_s), handle_signals=False)
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["frame"] for r in recs] == list(range(30))  # every frame, in order, once
    filled = [(r["frame"], d) for r in recs for d in r["detections"] if d.get("interpolated")]
    detected = [d for r in recs for d in r["detections"] if not d.get("interpolated")]
    assert len(detected) == res.detections == 30 - len(miss)  # fills are not detections
    assert res.interpolated == len(filled)
    if fill_s and len(miss) == 4:
        assert [f for f, _ in filled] == list(miss)
        for f, d in filled:
            assert d["track_id"] == 1 and d["score"] is None and d["class"] == "square"
            np.testing.assert_allclose(d["box"], square(f), atol=0.01)
        assert max(lags) >= 3  # the lines of the gap waited for the square to come back
    else:
        assert not filled
    # at most fill_s worth of frames (12 fps), plus the one line that waits for end events
    assert max(lags) <= int(np.ceil(fill_s * 12)) + 1, lags
    assert read_video_jsonl(jsonl).boxes == 30 - len(miss) + len(filled)  # eval --track scores the fills too

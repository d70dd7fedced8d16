"""MOTChallenge text files and ddetr's clip JSON: read like motmetrics reads them, written back."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import motmetrics as mm
import numpy as np
import pytest

from ddetr_cli.data import synth
from ddetr_cli.data.sequence import ImageSequence
from ddetr_cli.formats.mot import (
    TrackFileError,
    mot_lines,
    read_clip_json,
    read_mot_txt,
    read_seqinfo,
    read_truth,
    sequence_images,
)

GT = """1,1,10,20,30,40,1,1,1
1,2,50,60,10,10,0,1,1
2,1,12.5,20,30,40,1,1,0.5
3,3,100,100,20,20,1,1,1
"""


def test_gt_txt_reads_as_motmetrics_does(tmp_path: Path) -> None:
    p = tmp_path / "gt.txt"
    p.write_text(GT)
    ours = read_mot_txt(p)
    ref = mm.io.loadtxt(str(p), fmt="mot15-2D", min_confidence=1)  # drops "consider" = 0 rows, 1-based pixels -> 0-based
    assert sorted(ours.frames) == sorted(int(f) - 1 for f in ref.index.get_level_values(0).unique())
    for (frame, tid), row in ref.iterrows():
        ids, boxes = ours.get(int(frame) - 1)
        k = list(ids).index(tid)
        np.testing.assert_allclose(boxes[k], [row.X, row.Y, row.X + row.Width, row.Y + row.Height])
    assert 2 not in ours.ids  # the ignored row


def test_mot_lines_round_trip(tmp_path: Path) -> None:
    frames = {0: (np.array([3, 4]), np.array([[0.0, 1.0, 10.0, 21.0], [5.5, 6.0, 9.0, 9.5]])),
              7: (np.array([3]), np.array([[1.0, 2.0, 3.0, 4.0]]))}
    p = tmp_path / "res.txt"
    p.write_text(mot_lines(frames))
    back = read_mot_txt(p, ground_truth=False)
    assert sorted(back.frames) == [0, 7]
    for f, (ids, boxes) in frames.items():
        np.testing.assert_array_equal(back.get(f)[0], ids)
        np.testing.assert_allclose(back.get(f)[1], boxes, atol=0.01)
    assert p.read_text().splitlines()[0].startswith("1,3,1.00,2.00,10.00,20.00,")  # MOT: 1-based frames and pixels


def test_clip_json_is_the_generators_truth(tmp_path: Path) -> None:
    truth = synth.make_clip(tmp_path / "c.mp4", frames=10, size=(160, 120), fps=10, seed=1, scene="occluder")
    p = tmp_path / "c.json"
    p.write_text(json.dumps(synth.clip_json(truth, fps=10, size=(160, 120))))
    got = read_truth(p)
    assert got.processed == set(range(10)) and got.fps == 10
    for t in truth:
        ids, boxes = got.get(t["frame"])
        np.testing.assert_array_equal(ids, t["ids"])
        np.testing.assert_array_equal(boxes, t["boxes"].astype(int))


@pytest.mark.parametrize("text, match", [("1,2,3\n", "at least 6 values"), ("a,b,c,d,e,f\n", "not a MOT row"),
                                         ("0,1,1,1,1,1,1\n", "start at 1"), ("", "no boxes")])
def test_bad_mot_files_say_what_is_wrong(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "gt.txt"
    p.write_text(text)
    with pytest.raises(TrackFileError, match=match):
        read_mot_txt(p)
    with pytest.raises(TrackFileError, match="no such"):
        read_truth(tmp_path / "missing.txt")
    (tmp_path / "bad.json").write_text('{"frames": [{"frame": 0}]}')
    with pytest.raises(TrackFileError, match="clip ground truth"):
        read_clip_json(tmp_path / "bad.json")


# MOT17 ground truth with every kind of row TrackEval treats specially: scored pedestrians (class 1),
# a zero-marked pedestrian, distractors (2 person on vehicle, 7 static person, 8 distractor,
# 12 reflection), a vehicle (3), and tracker boxes on each of them
MOT17_GT = """1,1,10,10,40,80,1,1,1
1,2,100,10,40,80,0,1,0.5
1,3,200,10,40,80,1,7,1
1,4,300,10,60,40,1,3,1
2,1,12,10,40,80,1,1,1
2,3,200,10,40,80,1,7,1
2,5,400,10,40,80,1,8,0.2
3,1,14,10,40,80,1,1,1
3,6,100,100,40,80,1,1,1
3,7,400,10,40,80,0,12,1
4,6,102,100,40,80,1,1,1
4,8,200,200,40,80,1,2,1
"""
MOT17_RES = """1,11,10,10,40,80,0.9,-1,-1,-1
1,12,100,10,40,80,0.9,-1,-1,-1
1,13,201,10,40,80,0.9,-1,-1,-1
1,14,300,10,60,40,0.9,-1,-1,-1
2,11,12,11,40,80,0.9,-1,-1,-1
2,13,200,10,40,80,0.9,-1,-1,-1
2,15,401,10,40,80,0.9,-1,-1,-1
3,11,100,100,40,80,0.9,-1,-1,-1
3,16,14,10,40,80,0.9,-1,-1,-1
3,17,400,12,40,80,0.9,-1,-1,-1
4,16,102,100,40,80,0.9,-1,-1,-1
4,18,201,200,40,80,0.9,-1,-1,-1
4,19,500,500,20,20,0.9,-1,-1,-1
"""


def test_mot17_rules_score_as_trackeval_does(tmp_path: Path) -> None:
    """Zero-marked rows, other classes and distractors: our reader + scorer against trackers'
    own MOTChallenge loader and evaluation (its port of TrackEval's MOT17 preprocessing)."""
    from trackers.eval import evaluate_mot_sequence

    from ddetr_cli.engine.track_eval import score_tracks

    gt, res = tmp_path / "gt.txt", tmp_path / "res.txt"
    gt.write_text(MOT17_GT)
    res.write_text(MOT17_RES)
    truth = read_truth(gt)
    assert truth.ids == {1, 6}  # only considered pedestrians are objects
    ours = score_tracks(truth, read_mot_txt(res, ground_truth=False))
    ref = evaluate_mot_sequence(gt, res, metrics=["CLEAR", "HOTA", "Identity"])
    assert ours["MOTA"] == pytest.approx(ref.CLEAR.MOTA, abs=1e-9)
    assert ours["IDF1"] == pytest.approx(ref.Identity.IDF1, abs=1e-9)
    assert ours["HOTA"] == pytest.approx(float(np.mean(ref.HOTA.HOTA)) if np.ndim(ref.HOTA.HOTA) else ref.HOTA.HOTA, abs=1e-9)
    assert (ours["FP"], ours["FN"], ours["IDSW"]) == (ref.CLEAR.CLR_FP, ref.CLEAR.CLR_FN, ref.CLEAR.IDSW)
    # the boxes on distractors (static person, distractor, reflection, person on vehicle) are not false
    # positives; those on the zero-marked pedestrian, the vehicle and nothing are
    assert ours["FP"] == 3


def test_seqinfo_and_sequence_folder_round_trip(tmp_path: Path) -> None:
    seq = tmp_path / "SYN-01"
    truth = synth.make_mot_sequence(seq, frames=8, size=(160, 120), fps=12, seed=2, scene="occluder")
    info = read_seqinfo(seq)
    assert (info.name, info.fps, info.length, info.width, info.height, info.im_dir, info.im_ext) == \
        ("SYN-01", 12.0, 8, 160, 120, "img1", ".png")
    # the frames are the rendered pixels, as a MOTChallenge image folder names them
    images, _ = synth.render_clip(frames=8, size=(160, 120), seed=2, scene="occluder")
    files = sequence_images(seq)
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(1, 9)]
    for f, im in zip(files, images):
        np.testing.assert_array_equal(cv2.imread(str(f)), im)
    # read like a video (ddetr video SEQ/): in order, at the sequence's frame rate and size
    cap = ImageSequence(seq)
    assert (cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT), cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == (12.0, 8, 160)
    read = [cap.read() for _ in range(9)]
    assert [ok for ok, _ in read] == [True] * 8 + [False]
    for (_, got), im in zip(read, images):
        np.testing.assert_array_equal(got, im)
    # gt.txt as motmetrics reads MOT files: the same boxes (ids + 1), all considered
    ref = mm.io.loadtxt(str(seq / "gt" / "gt.txt"), fmt="mot15-2D", min_confidence=1)
    assert len(ref) == sum(len(t["ids"]) for t in truth)
    for t in truth:
        for i, b in zip(t["ids"], t["boxes"]):
            row = ref.loc[(t["frame"] + 1, int(i) + 1)]
            np.testing.assert_allclose([row.X, row.Y, row.X + row.Width, row.Y + row.Height], b, atol=1e-6)
    got = read_truth(seq / "gt" / "gt.txt")
    assert got.processed == set(range(8)) and got.fps == 12.0  # the sequence's frames, from seqinfo.ini
    (seq / "img1" / "000004.png").unlink()
    with pytest.raises(TrackFileError, match="1 of 8 frames missing"):
        sequence_images(seq)
    (seq / "seqinfo.ini").write_text("[Sequence]\nname=x\nframeRate=10\n")
    with pytest.raises(TrackFileError, match="no seqLength"):
        read_seqinfo(seq)

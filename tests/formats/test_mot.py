"""MOTChallenge text files and ddetr's clip JSON: read like motmetrics reads them, written back."""

from __future__ import annotations

import json
from pathlib import Path

import motmetrics as mm
import numpy as np
import pytest

from ddetr_cli.data import synth
from ddetr_cli.formats.mot import TrackFileError, mot_lines, read_clip_json, read_mot_txt, read_truth

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

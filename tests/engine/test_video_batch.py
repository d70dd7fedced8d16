"""Default batching of video files: consecutive frames go through the model together (the
detector's ``auto_batch`` for the frame size), with the detections of one frame at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ddetr_cli.engine.predictor import Detector
from ddetr_cli.engine.video import VideoPipeline

CLIP = Path(__file__).resolve().parents[2] / "examples" / "clip.mp4"


def test_video_file_batches_frames_by_default(tmp_path, batch_sizes):
    det = Detector.from_pretrained("demo", device="cpu")
    calls = batch_sizes(det)
    lines = {}
    for name, batch in (("auto", None), ("one", 1)):
        calls.clear()
        res = VideoPipeline(det, CLIP, tmp_path / name, batch=batch, save_json=True).run(handle_signals=False)
        assert res.frames == 45
        lines[name] = [json.loads(x) for x in Path(res.outputs["jsonl"]).read_text().splitlines()]
        if batch is None:
            size = det.auto_batch(det.input_shape(240, 320))
            assert size > 1 and calls == [size] * (45 // size) + ([45 % size] if 45 % size else [])
        else:
            assert calls == [1] * 45
    for a, b in zip(lines["auto"], lines["one"], strict=True):
        da, db = a["detections"], b["detections"]
        assert [d["label"] for d in da] == [d["label"] for d in db]
        assert np.allclose([d["box"] for d in da], [d["box"] for d in db], atol=0.02)
        assert np.allclose([d["score"] for d in da], [d["score"] for d in db], atol=1e-4)

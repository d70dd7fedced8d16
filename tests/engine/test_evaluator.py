"""`ddetr eval`: COCOeval agreement on known answers, class mapping, failure messages, COCO download."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import shutil
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import supervision as sv
from coco_reference import cocoeval_stats

from ddetr_cli.data import coco_val as coco_data
from ddetr_cli.data.datasets import load_dataset
from ddetr_cli.engine.evaluator import METRIC_NAMES, EvalError, coco_metrics, evaluate, ground_truth
from ddetr_cli.formats.labels import LabelTable

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
COCO_VAL_JSON = DATA / "coco" / "valid" / "_annotations.coco.json"
CLASSES = ["circle", "square", "triangle", "cross", "ring"]


class GroundTruthDetector:
    """Stands in for ``Detector``: answers each image with its ground truth, optionally altered.

    Images are recognised by content, so batching and decode order do not matter.
    shift: (dx, dy) pixels added to every box; noise: (jitter px, false positives per image)
    with random scores, seeded.
    """

    def __init__(self, dataset, class_names=CLASSES, shift=(0.0, 0.0), noise=None, empty=False, label_map=None):
        self.labels = LabelTable.from_names(list(class_names))
        self.by_image = {hashlib.md5(r.read().tobytes()).hexdigest(): r for r in dataset.records}
        self.shift, self.noise, self.empty = shift, noise, empty
        self.label_map = label_map or {i: i for i in range(len(dataset.class_names))}
        self.rng = np.random.default_rng(0)
        self.last_timing = {"preprocess": 0.001, "inference": 0.004, "postprocess": 0.0005}

    def predict_arrays(self, images, conf=0.3, max_det=100, classes=None):
        out = []
        for im in images:
            r = self.by_image[hashlib.md5(im.tobytes()).hexdigest()]
            boxes = r.boxes.astype(np.float64) + np.array([*self.shift, *self.shift])
            labels = np.array([self.label_map[int(x)] for x in r.labels], dtype=int)
            scores = np.ones(len(boxes))
            if self.noise is not None:
                jitter, n_fp = self.noise
                boxes = boxes + self.rng.normal(0, jitter, boxes.shape)
                scores = self.rng.uniform(0.2, 1.0, len(boxes))
                fp = self.rng.uniform(0, min(r.width, r.height) - 40, (n_fp, 2))
                boxes = np.concatenate([boxes, np.concatenate([fp, fp + 30], 1)])
                labels = np.concatenate([labels, self.rng.integers(0, len(CLASSES), n_fp)])
                scores = np.concatenate([scores, self.rng.uniform(0.0, 0.6, n_fp)])
            if self.empty:
                boxes, labels, scores = boxes[:0], labels[:0], scores[:0]
            out.append(sv.Detections(xyxy=boxes.astype(np.float32).reshape(-1, 4), confidence=scores.astype(np.float32),
                                     class_id=labels))
        return out


def _same(metrics: dict, stats: list[float]) -> None:
    for name, s in zip(METRIC_NAMES, stats):
        assert metrics[name] == (None if s < 0 else pytest.approx(s, abs=1e-12)), name


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc"])
def test_ground_truth_as_predictions_scores_ap_1(fmt, tmp_path):
    ds = load_dataset(DATA / fmt, "val")
    res = evaluate(GroundTruthDetector(ds), ds, batch=3, out_dir=tmp_path)
    assert res.metrics["AP"] == pytest.approx(1.0) and res.metrics["AP50"] == pytest.approx(1.0)
    assert res.metrics["AR100"] == pytest.approx(1.0)
    assert all(r["AP"] == pytest.approx(1.0) for r in res.per_class)
    assert res.images == 8 and res.detections == sum(len(r.boxes) for r in ds.records)
    assert not res.warnings
    assert (tmp_path / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["metrics"]["AP"] == pytest.approx(1.0) and len(m["per_class"]) == 5


def test_shifted_boxes_match_cocoeval_on_the_original_files(tmp_path):
    ds = load_dataset(DATA / "coco", "val")
    dx, dy = 6.0, -4.0
    res = evaluate(GroundTruthDetector(ds, shift=(dx, dy)), ds, batch=2, out_dir=tmp_path)
    # the expected answer, built from the annotation file alone
    gt = json.loads(COCO_VAL_JSON.read_text())
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
              "bbox": [a["bbox"][0] + dx, a["bbox"][1] + dy, a["bbox"][2], a["bbox"][3]]} for a in gt["annotations"]]
    pred_file = tmp_path / "expected_predictions.json"
    pred_file.write_text(json.dumps(preds))
    stats = cocoeval_stats(COCO_VAL_JSON, pred_file)
    assert 0.0 < stats[0] < 1.0  # the shift must matter, or the test proves nothing
    _same(res.metrics, stats)


def test_metrics_json_equals_cocoeval_of_saved_predictions(tmp_path):
    ds = load_dataset(DATA / "coco", "val")
    evaluate(GroundTruthDetector(ds, noise=(3.0, 4)), ds, batch=4, out_dir=tmp_path, save_predictions=True)
    saved = json.loads((tmp_path / "predictions.json").read_text())
    assert isinstance(saved, list) and set(saved[0]) == {"image_id", "category_id", "bbox", "score"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    stats = cocoeval_stats(COCO_VAL_JSON, tmp_path / "predictions.json")
    assert 0.0 < stats[0] < 1.0
    _same(metrics, stats)


def test_yolo_predictions_rescore_against_the_exported_ground_truth(tmp_path):
    ds = load_dataset(DATA / "yolo", "val")
    res = evaluate(GroundTruthDetector(ds, noise=(2.0, 2)), ds, out_dir=tmp_path, save_predictions=True)
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(ds.to_coco_dict()))  # categories 1..C, as evaluate numbers them
    _same(res.metrics, cocoeval_stats(gt_file, tmp_path / "predictions.json"))


def test_coco_metrics_api():
    ds = load_dataset(DATA / "coco", "val")
    gt = ground_truth(ds)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    assert coco_metrics(gt, perfect)["AP"] == pytest.approx(1.0)
    none = coco_metrics(gt, [])
    assert none["AP"] == 0.0 and none["AR100"] == 0.0
    assert set(none) == set(METRIC_NAMES)
    assert coco_metrics({"images": [], "annotations": [], "categories": []}, [])["AP"] is None


def test_zero_detections_give_ap_0_with_a_warning(tmp_path):
    ds = load_dataset(DATA / "voc", "val")
    res = evaluate(GroundTruthDetector(ds, empty=True), ds, out_dir=tmp_path)
    assert res.metrics["AP"] == 0.0 and res.detections == 0
    assert any("no detections" in w for w in res.warnings)
    assert (tmp_path / "metrics.json").is_file()


def test_model_with_classes_the_dataset_lacks(tmp_path):
    ds = load_dataset(DATA / "coco", "val")
    # model knows circle, SQUARE (case differs), dog; the dataset's label 0,1 map to model 0,1
    det = GroundTruthDetector(ds, class_names=["circle", "SQUARE", "dog"], label_map={0: 0, 1: 1, 2: 2, 3: 2, 4: 2})
    res = evaluate(det, ds)
    assert res.mapping.mode == "name"
    assert res.mapping.model_only == ["dog"]
    assert res.mapping.dataset_only == ["triangle", "cross", "ring"]
    text = " ".join(res.warnings)
    assert "dog" in text and "dropped" in text and "misses" in text
    rows = {r["class"]: r for r in res.per_class}
    assert rows["circle"]["AP"] == pytest.approx(1.0) and rows["ring"]["AP"] == 0.0
    assert rows["ring"]["in_model"] is False
    assert res.metrics["AP"] == pytest.approx(2 / 5)  # three of five classes are all misses


def test_no_class_in_common_is_one_clear_error():
    ds = load_dataset(DATA / "coco", "val")
    with pytest.raises(EvalError, match="none of the model's 2 classes"):
        evaluate(GroundTruthDetector(ds, class_names=["dog", "cat"]), ds)


def test_coco_style_model_matches_by_id():
    ds = load_dataset(DATA / "coco", "val")
    # slot 0 unnamed: label index is the category id (1..5 here)
    det = GroundTruthDetector(ds, class_names=["", *CLASSES], label_map={i: i + 1 for i in range(5)})
    res = evaluate(det, ds)
    assert res.mapping.mode == "id" and res.metrics["AP"] == pytest.approx(1.0)
    # same layout but other names at those ids: not the same categories, so names decide
    det = GroundTruthDetector(ds, class_names=["", "ring", "circle", "square", "triangle", "cross", "dog"],
                              label_map={0: 2, 1: 3, 2: 4, 3: 5, 4: 1})
    res = evaluate(det, ds)
    assert res.mapping.mode == "name" and res.mapping.model_only == ["dog"]
    assert res.metrics["AP"] == pytest.approx(1.0)


def test_missing_and_unreadable_images_are_reported(tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(DATA / "coco", root)
    (root / "valid" / "val_00001.jpg").unlink()
    (root / "valid" / "val_00002.jpg").write_bytes(b"not a jpeg")
    ds = load_dataset(root, "val")
    good = load_dataset(DATA / "coco", "val")
    res = evaluate(GroundTruthDetector(good), ds, out_dir=tmp_path / "run")
    assert res.images == 6 and len(res.skipped) == 1 and "val_00002.jpg" in res.skipped[0]
    assert any("skipped 1 unreadable" in w for w in res.warnings)
    assert any("val_00001.jpg" in n for n in res.dataset["notes"])
    assert res.metrics["AP"] == pytest.approx(1.0)  # the skipped images' boxes are not counted as misses


def test_max_images_and_speed(tmp_path):
    ds = load_dataset(DATA / "coco", "val")
    res = evaluate(GroundTruthDetector(ds), ds, max_images=3, batch=1)
    assert res.images == 3
    assert res.speed["inference_ms"] == pytest.approx(4.0) and res.speed["preprocess_ms"] == pytest.approx(1.0)
    assert res.speed["warmup_excluded"] is True and res.speed["images_per_second"] > 0


# --------------------------------------------------------------------------- CLI


def _main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from ddetr_cli.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ddetr", *args])
    with pytest.raises(SystemExit) as e:
        main()
    cap = capsys.readouterr()
    return int(e.value.code or 0), cap.out, cap.err


def test_cli_eval_folder_with_tiny_model(tmp_path, tiny_model_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, err = _main(["eval", str(DATA / "yolo"), "--model", str(tiny_model_path), "--imgsz", "128",
                               "--batch", "4", "--max-images", "4", "--out", str(out), "--save-predictions", "--json"],
                              monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["images"] == 4 and set(summary["metrics"]) == set(METRIC_NAMES)
    assert summary["detections"] == 4 * 100  # no threshold: the top 100 per image
    assert {"metrics", "predictions", "pr_curve"} <= set(summary["outputs"])
    ds = load_dataset(DATA / "yolo", "val")
    gt = ground_truth(ds, ds.records[:4])
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    _same(json.loads((out / "metrics.json").read_text())["metrics"], cocoeval_stats(gt_file, out / "predictions.json"))

    code, _, err = _main(["eval", str(DATA / "coco"), "--model", str(tiny_model_path), "--imgsz", "96",
                          "--max-images", "2", "--out", str(tmp_path / "run2")], monkeypatch, capsys)
    assert code == 0, err
    assert "AP50" in err and "per-class AP" in err and "img/s" in err


def test_cli_errors_are_one_line(tmp_path, tiny_model_path, monkeypatch, capsys):
    monkeypatch.setenv("DDETR_COCO_URL", f"http://127.0.0.1:{_closed_port()}")
    cases = [
        (["eval", "coco", "--model", str(tiny_model_path)], "--data FOLDER"),
        (["eval", "coco", "--data", str(tmp_path)], "missing val2017/"),
        (["eval", str(tmp_path / "nope"), "--model", str(tiny_model_path)], "does not exist"),
        (["eval", str(DATA / "coco"), "--split", "test", "--model", str(tiny_model_path)], "no split 'test'"),
    ]
    for args, needle in cases:
        code, _, err = _main(args, monkeypatch, capsys)
        assert code != 0, args
        assert needle in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error:"), err


# --------------------------------------------------------------------------- COCO download


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def fake_coco_server():
    """A local server with a tiny val2017.zip and annotations zip, honouring Range requests.

    ``server.cut`` = bytes after which the next response is broken off (once).
    """
    gt = json.loads(COCO_VAL_JSON.read_text())
    gt["images"] = gt["images"][:3]
    keep = {im["id"] for im in gt["images"]}
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    images = {f"val2017/{im['file_name']}": (COCO_VAL_JSON.parent / im["file_name"]).read_bytes() for im in gt["images"]}
    files = {
        "zips/val2017.zip": _zip(images),
        "annotations/annotations_trainval2017.zip": _zip({
            "annotations/instances_val2017.json": json.dumps(gt).encode(),
            "annotations/captions_val2017.json": b"{}",  # present in the real archive, not wanted
        }),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            rng = self.headers.get("Range")
            server.ranges.append(rng)
            start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            data = body[start:]
            if server.cut is not None:
                data, server.cut = data[: server.cut], None
                self.wfile.write(data)
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.cut, server.ranges = None, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.specs = tuple(
        coco_data.RemoteFile(f.name, f.path, len(files[f.path]), hashlib.md5(files[f.path]).hexdigest(), f.extract)
        for f in coco_data.VAL2017
    )
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


def test_download_with_progress_then_cached(tmp_path, fake_coco_server):
    seen: dict[str, list[int]] = {}
    root = coco_data.ensure_val2017(cache=tmp_path / "coco", files=fake_coco_server.specs, url=fake_coco_server.url,
                                    progress=lambda name, done, total: seen.setdefault(name, []).append(done))
    assert coco_data.missing_parts(root) == []
    assert len(list((root / "val2017").glob("*.jpg"))) == 3
    assert not (root / "annotations" / "captions_val2017.json").exists()
    assert not list(root.glob("*.zip*"))  # archives removed once unpacked
    for spec in fake_coco_server.specs:
        done = seen[spec.name]
        assert done == sorted(done) and done[-1] == spec.size
    ds = load_dataset(root, "val", format="coco")
    assert len(ds) == 3
    n = len(fake_coco_server.ranges)
    assert coco_data.ensure_val2017(cache=tmp_path / "coco", files=fake_coco_server.specs,
                                    url=fake_coco_server.url) == root
    assert len(fake_coco_server.ranges) == n  # nothing fetched again


def test_interrupted_download_resumes_with_range(tmp_path, fake_coco_server):
    spec = fake_coco_server.specs[0]
    fake_coco_server.cut = spec.size // 3
    dest = tmp_path / spec.name
    with pytest.raises(coco_data.DownloadError, match="run the command again to resume") as e:
        coco_data.download(f"{fake_coco_server.url}/{spec.path}", dest, size=spec.size, md5=spec.md5)
    assert e.value.resumable
    part = dest.with_name(dest.name + ".part")
    assert part.stat().st_size == spec.size // 3
    coco_data.download(f"{fake_coco_server.url}/{spec.path}", dest, size=spec.size, md5=spec.md5)
    assert fake_coco_server.ranges[-1] == f"bytes={spec.size // 3}-"
    assert hashlib.md5(dest.read_bytes()).hexdigest() == spec.md5 and not part.exists()
    # within ensure_val2017 a broken transfer is retried from where it stopped
    fake_coco_server.cut = 100
    root = coco_data.ensure_val2017(cache=tmp_path / "c2", files=fake_coco_server.specs, url=fake_coco_server.url)
    assert coco_data.missing_parts(root) == [] and "bytes=100-" in fake_coco_server.ranges


def test_checksum_mismatch_is_caught(tmp_path, fake_coco_server):
    spec = fake_coco_server.specs[1]
    bad = coco_data.RemoteFile(spec.name, spec.path, spec.size, "0" * 32, spec.extract)
    with pytest.raises(coco_data.DownloadError, match="failed its checksum") as e:
        coco_data.ensure_val2017(cache=tmp_path / "coco", files=(bad,), url=fake_coco_server.url)
    assert not e.value.resumable
    assert not list((tmp_path / "coco").glob(spec.name + "*"))  # the bad file is gone
    wrong_size = coco_data.RemoteFile(spec.name, spec.path, spec.size + 1, None, spec.extract)
    with pytest.raises(coco_data.DownloadError, match="expected"):
        coco_data.ensure_val2017(cache=tmp_path / "coco", files=(wrong_size,), url=fake_coco_server.url)


def test_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DDETR_COCO_URL", f"http://127.0.0.1:{_closed_port()}/")
    with pytest.raises(coco_data.CocoUnavailable) as e:
        coco_data.ensure_val2017(cache=tmp_path / "coco")
    msg = str(e.value)
    assert "\n" not in msg and "connection refused" in msg and "--data FOLDER" in msg
    assert coco_data.base_url().startswith("http://127.0.0.1:")


def test_cli_eval_coco_downloads_into_the_cache(tmp_path, tiny_model_path, fake_coco_server, monkeypatch, capsys):
    monkeypatch.setenv("DDETR_COCO_URL", fake_coco_server.url)
    monkeypatch.setattr(coco_data, "VAL2017", fake_coco_server.specs)  # the fake archives' sizes and sums
    code, _, err = _main(["eval", "coco", "--model", str(tiny_model_path), "--imgsz", "96", "--out",
                          str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 0, err
    assert "val2017.zip" in err and "annotations_trainval2017.zip" in err  # the download bars
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["images"] == 3
    assert coco_data.missing_parts(coco_data.cache_dir()) == []


# --------------------------------------------------------------------------- model card


DEMO = ROOT / "weights" / "demo.safetensors"


def _card_map(card: str) -> float | None:
    """The COCO mAP (0.5:0.95) a model card states, as a fraction; None if it states none.

    IoU ranges ("@[.5:.95]", "50-95") are removed first so their digits are not mistaken for the
    value; lines about AP50 alone are skipped.
    """
    for line in card.splitlines():
        if not re.search(r"\bm?AP\b|mAP", line):
            continue
        rest = re.sub(r"\d*\.?\d+\s*[:\-]\s*\d*\.?\d+", " ", line)
        if re.search(r"AP\s*@?\s*(50|0?\.5)\b", rest):
            continue
        m = re.search(r"m?AP\b[^0-9]*?([0-9]+(?:\.[0-9]+)?)", rest)
        if m:
            v = float(m.group(1))
            return v / 100 if v > 1 else v
    return None


def test_card_map_parser():
    assert _card_map("| metric | value |\n| mAP@[.5:.95] | 0.412 |") == pytest.approx(0.412)
    assert _card_map("AP50: 0.7\nmAP 50-95: 41.2") == pytest.approx(0.412)
    assert _card_map("trained for 10 epochs") is None


@pytest.mark.slow
@pytest.mark.skipif(not DEMO.is_file(), reason="no bundled demo model yet")
def test_demo_model_card_number_is_reproduced(tmp_path, monkeypatch, capsys):
    """The card's mAP is what `ddetr eval` gives on the held-out synthetic split the card names
    (regenerated here with the card's own generator command: same seed, same images)."""
    card = DEMO.with_suffix(".md").read_text()
    claimed = _card_map(card)
    assert claimed is not None, "weights/demo.md states no mAP"
    m = re.search(r"synth dataset \S+ --train 0 --val 0 --test (\d+) --seed (\d+)", card)
    assert m, "weights/demo.md does not give the command that regenerates its held-out split"
    from ddetr_cli.data.synth import generate

    generate(tmp_path / "heldout", n_train=0, n_val=0, n_test=int(m.group(1)), seed=int(m.group(2)), formats=("coco",))
    code, stdout, err = _main(["eval", str(tmp_path / "heldout" / "coco"), "--split", "test", "--model", str(DEMO),
                               "--out", str(tmp_path / "run"), "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(stdout)["metrics"]["AP"] == pytest.approx(claimed, abs=0.005)

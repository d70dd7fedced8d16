"""`ddetr detect` end to end: bad files, COCO/YOLO/VOC outputs, parity with transformers, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv
from typer.testing import CliRunner

from ddetr_cli.cli.main import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"
runner = CliRunner()


def _images_folder(tmp_path: Path, n_good: int = 3, bad: bool = True) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(240, 320), (300, 200), (180, 260), (220, 220)]
    for i in range(n_good):
        h, w = sizes[i % len(sizes)]
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        cv2.rectangle(img, (20, 30), (w // 2, h // 2), (0, 0, 255), -1)
        cv2.imwrite(str(folder / f"good{i}.{'png' if i % 2 else 'jpg'}"), img)
    if bad:
        good = (folder / "good0.jpg").read_bytes()
        (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
        (folder / "empty.jpg").write_bytes(b"")
        (folder / "notes.jpg").write_text("this is not an image\n")
    return folder


def _run(args: list[str]):
    return runner.invoke(app, args, catch_exceptions=False)


def test_folder_with_bad_files(tmp_path, tiny_model_path):
    folder = _images_folder(tmp_path)
    out = tmp_path / "run"
    r = _run(["detect", str(folder), "--model", str(tiny_model_path), "--out", str(out), "--imgsz", "256",
              "--conf", "0.05", "--json", "--format", "coco,yolo,voc"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["images"] == 3
    skipped = {Path(s["file"]).name for s in summary["skipped"]}
    assert skipped == {"truncated.jpg", "empty.jpg", "notes.jpg"}
    pred = json.loads((out / "predictions.json").read_text())
    assert {Path(s["file"]).name for s in pred["info"]["skipped"]} == skipped
    assert pred["info"]["incomplete"] is False
    assert len(list((out / "annotated").iterdir())) == 3

    # pycocotools reads it; ids unique; categories from 1; boxes inside their images
    from pycocotools.coco import COCO

    coco = COCO(str(out / "predictions.json"))
    assert len(coco.getImgIds()) == 3
    anns = pred["annotations"]
    assert anns, "the tiny model with lifted class bias must produce detections at conf 0.05"
    assert len({a["id"] for a in anns}) == len(anns)
    assert min(c["id"] for c in pred["categories"]) >= 1
    assert [c["name"] for c in pred["categories"]] == ["circle", "square", "triangle", "cross", "ring"]
    sizes = {im["id"]: (im["width"], im["height"]) for im in pred["images"]}
    for a in anns:
        x, y, w, h = a["bbox"]
        W, H = sizes[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W + 0.01 and y + h <= H + 0.01
        assert 0 < a["score"] <= 1 and a["iscrowd"] == 0 and a["segmentation"] == []
        assert a["area"] == pytest.approx(w * h, abs=0.05)


def test_yolo_and_voc_round_trip(tmp_path, tiny_model_path):
    """The YOLO and VOC files hold the same detections as predictions.json (read back with
    supervision's own loaders)."""
    folder = _images_folder(tmp_path, n_good=2, bad=False)
    out = tmp_path / "run"
    r = _run(["detect", str(folder), "--model", str(tiny_model_path), "--out", str(out), "--imgsz", "256",
              "--conf", "0.05", "--format", "coco", "--format", "yolo,voc", "--quiet"])
    assert r.exit_code == 0, r.output
    pred = json.loads((out / "predictions.json").read_text())
    names = [c["name"] for c in pred["categories"]]
    by_image: dict[str, list] = {}
    for im in pred["images"]:
        by_image[Path(im["file_name"]).stem] = [
            (a["category_id"] - 1, a["bbox"]) for a in pred["annotations"] if a["image_id"] == im["id"]
        ]
    assert sum(len(v) for v in by_image.values()) > 0

    yolo = sv.DetectionDataset.from_yolo(images_directory_path=str(folder), annotations_directory_path=str(out / "labels"),
                                         data_yaml_path=str(out / "data.yaml"))
    voc = sv.DetectionDataset.from_pascal_voc(images_directory_path=str(folder),
                                              annotations_directory_path=str(out / "voc" / "Annotations"))
    for ds, tol in ((yolo, 1.0), (voc, 1.5)):
        seen = 0
        for path, _, dets in ds:
            expected = by_image[Path(path).stem]
            assert len(dets) == len(expected)
            want = [(names[c], np.array([x, y, x + w, y + h])) for c, (x, y, w, h) in expected]
            for c, b in zip(dets.class_id, dets.xyxy):
                # every read-back box has its twin (same class, same place) in predictions.json
                d = min(np.abs(b - wb).max() for wn, wb in want if wn == ds.classes[int(c)])
                assert d <= tol, (ds.classes[int(c)], b)
            seen += 1
        assert seen == 2


def test_nothing_readable_exits_nonzero(tmp_path, tiny_model_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    r = _run(["detect", str(folder), "--model", str(tiny_model_path), "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code != 0
    assert "no image could be read" in r.output


@pytest.mark.slow
def test_bad_arguments_one_line(tmp_path, tiny_model_path):
    env = {**os.environ, "DDETR_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    img = _images_folder(tmp_path, 1, bad=False) / "good0.jpg"
    cases = [
        (["detect", str(tmp_path / "missing.jpg"), "--model", str(tiny_model_path)], "no such file"),
        (["detect", str(img), "--model", str(tmp_path / "nope.pth")], "not found"),
        (["detect", str(img), "--model", str(tiny_model_path), "--classes", "unicorn"], "unknown class"),
        (["detect", str(img), "--model", str(tiny_model_path), "--format", "xml"], "unknown --format"),
        # default model, offline, not cached: says how to proceed
        (["detect", str(img)], "--model demo"),
    ]
    for args, needle in cases:
        p = subprocess.run([sys.executable, "-m", "ddetr_cli", *args, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert p.returncode != 0, args
        assert needle in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr


def test_sources_glob_list_and_url_error(tmp_path, tiny_model_path):
    folder = _images_folder(tmp_path, n_good=3, bad=False)
    sub = folder / "sub"
    sub.mkdir()
    (sub / "deep.png").write_bytes((folder / "good1.png").read_bytes())
    lst = tmp_path / "list.txt"
    lst.write_text(f"{folder / 'good0.jpg'}\n# comment\nimgs/good2.jpg\nhttp://127.0.0.1:9/none.jpg\n")
    r = _run(["detect", str(lst), f"{folder}/**/*.png", "--model", str(tiny_model_path), "--out", str(tmp_path / "o"),
              "--imgsz", "128", "--json", "--no-save-images"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout[r.stdout.index("{"):])
    assert s["images"] == 4  # good0, good2 from the list; good1.png and sub/deep.png from the glob
    assert len(s["skipped"]) == 1 and "unreachable" in s["skipped"][0]["reason"]
    r = _run(["detect", str(folder), "-r", "--model", str(tiny_model_path), "--out", str(tmp_path / "o2"),
              "--imgsz", "128", "--json", "--no-save-images"])
    names = {im["file_name"] for im in json.loads((tmp_path / "o2" / "predictions.json").read_text())["images"]}
    assert "sub/deep.png" in names and len(names) == 4


def test_run_folders_never_overwrite(tmp_path, tiny_model_path):
    img = _images_folder(tmp_path, 1, bad=False) / "good0.jpg"
    for _ in range(2):
        p = subprocess.run([sys.executable, "-m", "ddetr_cli", "detect", str(img), "--model", str(tiny_model_path),
                            "--imgsz", "128", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    assert sorted(d.name for d in (tmp_path / "runs" / "detect").iterdir()) == ["exp", "exp2"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_leaves_valid_incomplete_json(sig, tmp_path, tiny_model_path):
    folder = tmp_path / "many"
    folder.mkdir()
    img = (np.random.default_rng(1).random((96, 128, 3)) * 255).astype(np.uint8)
    for i in range(400):
        cv2.imwrite(str(folder / f"im{i:04d}.jpg"), img)
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "ddetr_cli", "detect", str(folder), "--model", str(tiny_model_path),
                          "--imgsz", "96", "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        ann = out / "annotated"
        if ann.is_dir() and len(list(ann.iterdir())) >= 5:
            break
        time.sleep(0.2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["info"]["incomplete"] is True
    assert 5 <= len(pred["images"]) < 400
    assert pred["info"]["images_processed"] == len(pred["images"])


def test_default_batches_same_shape_images_unpadded(tmp_path, batch_sizes):
    """Default batching: consecutive images the model sees at one shape go through together,
    never padded, so every image gets the detections of a batch-1 run; a different shape starts
    a new batch. The demo model on real shape pictures (examples/images) rescaled to sizes."""
    from ddetr_cli.engine.detect import run_detect
    from ddetr_cli.engine.predictor import Detector

    src = cv2.imread(str(Path(__file__).resolve().parents[2] / "examples" / "images" / "shapes_1_640x480.jpg"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = [(640, 480)] * 4 + [(500, 480), (640, 480), (640, 480)]
    for i, (w, h) in enumerate(sizes):
        img = np.roll(cv2.resize(src, (w, h)), 37 * i, axis=1)  # different content per image
        cv2.imwrite(str(folder / f"im{i}.png"), img)
    det = Detector.from_pretrained("demo", device="cpu")
    assert det.auto_batch(det.input_shape(480, 640)) >= 4 and det.auto_batch((800, 1066)) == 1
    calls = batch_sizes(det)
    run_detect(det, [str(folder)], tmp_path / "auto", save_images=False)
    assert calls == [4, 1, 2]
    calls.clear()
    run_detect(det, [str(folder)], tmp_path / "one", batch=1, save_images=False)
    assert calls == [1] * 7

    def anns(run):
        d = json.loads((tmp_path / run / "predictions.json").read_text())
        files = {im["id"]: im["file_name"] for im in d["images"]}
        return sorted((files[a["image_id"]], a["category_id"], a["score"], *a["bbox"]) for a in d["annotations"])

    def same(x, y) -> bool:  # scores to 1e-4; boxes to COCO's 0.01 px rounding step
        return len(x) == len(y) and all(a[:2] == b[:2] and abs(a[2] - b[2]) <= 1e-4
                                        and np.allclose(a[3:], b[3:], atol=0.0101) for a, b in zip(x, y))

    auto, one = anns("auto"), anns("one")
    assert len(one) > 7 and same(auto, one)
    # the check sees padding: one padded batch of all seven changes the odd-sized image's boxes
    run_detect(det, [str(folder)], tmp_path / "padded", batch=7, save_images=False)
    padded = anns("padded")
    assert not same([a for a in padded if a[0] == "im4.png"], [a for a in one if a[0] == "im4.png"])


def test_threads_option_sets_and_reports_cpu_threads(tmp_path, tiny_model_path):
    """``--threads 1`` runs the model on one CPU thread and says so in the JSON summary, as does
    the default run with torch's own count (every physical core)."""
    import torch

    folder = _images_folder(tmp_path, n_good=2, bad=False)
    before = torch.get_num_threads()
    try:
        for threads, expect in ((["--threads", "1"], 1), ([], before)):
            torch.set_num_threads(before)
            r = _run(["detect", str(folder), "--model", str(tiny_model_path), "--out", str(tmp_path / f"run{expect}"),
                      "--exist-ok", "--imgsz", "256", "--json", "--no-save-images", *threads])
            assert r.exit_code == 0, r.output
            summary = json.loads(r.stdout[r.stdout.index("{"):])
            assert summary["threads"] == expect and summary["images"] == 2 and summary["batches"] >= 1
        r = _run(["detect", str(folder), "--model", str(tiny_model_path), "--threads", "0"])
        assert r.exit_code == 2 and "--threads" in r.output
    finally:
        torch.set_num_threads(before)

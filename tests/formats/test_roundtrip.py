"""Round trips of `ddetr detect` output through the readers of the tools users import it into:
pycocotools, supervision, ultralytics and Datumaro (CVAT's importer), each reading the run folder
as `ddetr detect` left it. Every reader must give back every box of predictions.json (same class
name, within 1 px; COCO readers the same score)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv
from scipy.optimize import linear_sum_assignment
from typer.testing import CliRunner

from ddetr_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "images"
runner = CliRunner()
NAMES = ["circle", "square", "triangle", "cross", "ring"]  # the demo model's label table


def _detect(args: list[str], env: dict | None = None):
    r = runner.invoke(app, ["detect", *args], catch_exceptions=False, env=env)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One `ddetr detect` of the example images with the demo model, all three formats."""
    out = tmp_path_factory.mktemp("rt") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDETR_HOME", str(out.parent / "home"))
        _detect([str(EXAMPLES), "--model", "demo", "--conf", "0.3", "--format", "coco,yolo,voc", "--out", str(out), "--quiet"])
    return out


def _expected(run: Path) -> dict[str, list[tuple[str, np.ndarray, float]]]:
    """predictions.json per image stem: (class name, xyxy, score)."""
    pred = json.loads((run / "predictions.json").read_text())
    names = {c["id"]: c["name"] for c in pred["categories"]}
    out: dict[str, list] = {Path(im["file_name"]).stem: [] for im in pred["images"]}
    stem = {im["id"]: Path(im["file_name"]).stem for im in pred["images"]}
    for a in pred["annotations"]:
        x, y, w, h = a["bbox"]
        out[stem[a["image_id"]]].append((names[a["category_id"]], np.array([x, y, x + w, y + h]), a["score"]))
    return out


def _match(got: list[tuple[str, np.ndarray]], want: list[tuple[str, np.ndarray, float]], tol: float, what: str) -> list[int]:
    """One-to-one matching of read-back boxes to predictions.json (same class, within ``tol``
    px on every side); returns, for each read-back box, the index of its twin in ``want``."""
    assert len(got) == len(want), f"{what}: {len(got)} boxes read back, {len(want)} in predictions.json"
    if not got:
        return []
    cost = np.full((len(got), len(want)), 1e6)
    for i, (gn, gb) in enumerate(got):
        for j, (wn, wb, _) in enumerate(want):
            if gn == wn:
                cost[i, j] = np.abs(np.asarray(gb, float) - wb).max()
    rows, cols = linear_sum_assignment(cost)
    worst = cost[rows, cols].max()
    assert worst <= tol, f"{what}: a box is {worst:.2f} px from its twin (or has no twin of its class)"
    twin = [0] * len(got)
    for r, c in zip(rows, cols):
        twin[r] = int(c)
    return twin


def test_run_folder_layout_and_coco_with_pycocotools(run):
    from pycocotools.coco import COCO

    pred = json.loads((run / "predictions.json").read_text())
    assert len(pred["annotations"]) >= 20  # the demo model finds the shapes: a test with boxes to compare
    coco = COCO(str(run / "predictions.json"))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(NAMES)
    assert len(coco.getImgIds()) == 6
    # the results API (scores) takes the annotations as they are
    res = coco.loadRes(copy.deepcopy(pred["annotations"]))  # (it edits what it is given)
    assert sorted(a["score"] for a in res.loadAnns(res.getAnnIds())) == sorted(a["score"] for a in pred["annotations"])
    for im in pred["images"]:
        # every record keeps where its image came from; images/ holds that image under file_name
        src = Path(im["ddetr_source"])
        assert src.is_absolute() and src == EXAMPLES / im["file_name"]
        assert (run / "images" / im["file_name"]).read_bytes() == src.read_bytes()
        assert (run / "labels" / f"{src.stem}.txt").is_file()
        assert (run / "voc" / "Annotations" / f"{src.stem}.xml").is_file()
        assert (run / "annotated" / im["file_name"]).is_file()
    # Datumaro/CVAT's place for the same file
    assert json.loads((run / "annotations" / "instances_default.json").read_text()) == pred
    assert (run / "classes.txt").read_text().splitlines() == NAMES
    assert (run / "voc" / "labelmap.txt").read_text().splitlines() == ["# label:color_rgb:parts:actions"] + [f"{n}:::" for n in NAMES]
    assert sorted((run / "voc" / "ImageSets" / "Main" / "default.txt").read_text().split()) == sorted(
        Path(im["file_name"]).stem for im in pred["images"])


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc"])
def test_supervision_reads_every_box(run, fmt):
    want = _expected(run)
    if fmt == "coco":
        ds = sv.DetectionDataset.from_coco(images_directory_path=str(run / "images"),
                                           annotations_path=str(run / "predictions.json"))
    elif fmt == "yolo":
        ds = sv.DetectionDataset.from_yolo(images_directory_path=str(run / "images"),
                                           annotations_directory_path=str(run / "labels"),
                                           data_yaml_path=str(run / "data.yaml"))
        assert ds.classes == NAMES  # names in YOLO index order
    else:
        ds = sv.DetectionDataset.from_pascal_voc(images_directory_path=str(run / "voc" / "JPEGImages"),
                                                 annotations_directory_path=str(run / "voc" / "Annotations"))
    seen = set()
    for path, _, dets in ds:
        stem = Path(path).stem
        got = [(ds.classes[int(c)], b) for c, b in zip(dets.class_id, dets.xyxy)]
        _match(got, want[stem], 1.0, f"supervision {fmt} {stem}")
        seen.add(stem)
    assert seen == set(want)


def test_ultralytics_reads_every_box(run, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics"))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(run / "data.yaml"))  # ultralytics' own checker (train/val exist, names)
    assert data["names"] == dict(enumerate(NAMES)) and data["nc"] == 5
    assert Path(data["train"]) == Path(data["val"]) == (run / "images").resolve()
    ds = YOLODataset(img_path=data["train"], data=data, task="detect", augment=False, imgsz=320)
    want = _expected(run)
    assert {Path(lb["im_file"]).stem for lb in ds.labels} == set(want)
    for lb in ds.labels:
        h, w = lb["shape"]
        got = []
        for c, (cx, cy, bw, bh) in zip(lb["cls"].ravel(), lb["bboxes"]):
            got.append((data["names"][int(c)], np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])))
        _match(got, want[Path(lb["im_file"]).stem], 1.0, f"ultralytics {lb['im_file']}")


def _datumaro_python() -> str:
    """Datumaro lives in its own virtualenv (it pins opencv < 5 and pillow 12); README's install
    step makes it at .venv-datumaro, DDETR_DATUMARO_PYTHON names another."""
    py = os.environ.get("DDETR_DATUMARO_PYTHON") or str(ROOT / ".venv-datumaro" / "bin" / "python")
    if not Path(py).exists():
        pytest.fail(f"no Datumaro environment at {py}: run README's install step "
                    "(python -m venv .venv-datumaro && .venv-datumaro/bin/pip install datumaro==1.13.12)")
    return py


def test_datumaro_imports_every_format(run):
    p = subprocess.run([_datumaro_python(), str(ROOT / "tests" / "datumaro_probe.py"), str(run)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout)
    want = _expected(run)
    for fmt in ("coco_instances", "yolo", "voc_detection"):
        ds = got[fmt]
        assert sorted(ds["labels"]) == sorted(NAMES), fmt
        assert set(ds["items"]) == set(want), fmt
        for stem, anns in ds["items"].items():
            boxes = [(n, np.array([x, y, x + w, y + h])) for n, x, y, w, h, _ in anns]
            twin = _match(boxes, want[stem], 1.0, f"datumaro {fmt} {stem}")
            if fmt == "coco_instances":  # scores come through as the `score` attribute
                assert [a[5] for a in anns] == [want[stem][j][2] for j in twin], stem


def test_save_conf_sixth_column(run, tmp_path):
    out = tmp_path / "conf"
    _detect([str(EXAMPLES), "--model", "demo", "--conf", "0.3", "--format", "yolo", "--save-conf", "--out", str(out),
             "--quiet", "--no-save-images"])
    want = _expected(out)
    assert sum(map(len, want.values())) >= 20
    for stem, boxes in want.items():
        im = cv2.imread(str(out / "images" / f"{stem}.jpg"))
        h, w = im.shape[:2]
        rows = [ln.split() for ln in (out / "labels" / f"{stem}.txt").read_text().splitlines()]
        assert all(len(r) == 6 for r in rows), rows
        got = []
        for c, cx, cy, bw, bh, _ in (map(float, r) for r in rows):
            got.append((NAMES[int(c)], np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])))
        twin = _match(got, boxes, 1.0, stem)
        assert [float(r[5]) for r in rows] == [boxes[j][2] for j in twin]
    # without --save-conf: five columns (the run fixture)


def test_same_name_in_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(EXAMPLES / "shapes_0_320x240.jpg", a / "x.jpg")
    shutil.copy(EXAMPLES / "shapes_1_640x480.jpg", b / "x.jpg")
    cv2.imwrite(str(b / "X.png"), cv2.imread(str(EXAMPLES / "shapes_3_640x360.jpg")))  # same stem, other case and suffix
    out = tmp_path / "run"
    _detect([str(a / "x.jpg"), str(b / "x.jpg"), str(b / "X.png"), "--model", "demo", "--conf", "0.3",
             "--format", "coco,yolo,voc", "--out", str(out), "--quiet"])
    pred = json.loads((out / "predictions.json").read_text())
    recs = pred["images"]
    assert [r["ddetr_source"] for r in recs] == [str(a / "x.jpg"), str(b / "x.jpg"), str(b / "X.png")]
    stems = [Path(r["file_name"]).stem for r in recs]
    assert len({s.lower() for s in stems}) == 3, stems
    for r, stem in zip(recs, stems):
        src = Path(r["ddetr_source"])
        assert (out / "images" / r["file_name"]).read_bytes() == src.read_bytes()
        assert (out / "annotated" / r["file_name"]).is_file()
        n = sum(1 for ann in pred["annotations"] if ann["image_id"] == r["id"])
        assert n > 0
        assert len((out / "labels" / f"{stem}.txt").read_text().splitlines()) == n
        assert (out / "voc" / "Annotations" / f"{stem}.xml").read_text().count("<object>") == n
        assert (r["width"], r["height"]) == cv2.imread(str(src)).shape[1::-1]


def _plain_json(text: str):
    assert "\x1b" not in text, repr(text[:200])
    return json.loads(text)


def test_json_is_plain_whatever_the_terminal(tmp_path):
    env = {**os.environ, "FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "80"}
    env.pop("NO_COLOR", None)
    img = str(EXAMPLES / "shapes_0_320x240.jpg")
    for args in (["detect", img, "--model", "demo", "--json", "--out", str(tmp_path / "o")],
                 ["info", "--json"], ["weights", "list", "--json"]):
        p = subprocess.run([sys.executable, "-m", "ddetr_cli", *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        assert p.returncode == 0, p.stderr
        data = _plain_json(p.stdout)
        # what `| python -m json.tool` does
        assert subprocess.run([sys.executable, "-m", "json.tool"], input=p.stdout, capture_output=True, text=True).returncode == 0
        if args[0] == "detect":
            assert data["images"] == 1 and data["outputs"]["coco"].endswith("predictions.json")
    # and in process, through CliRunner with colour forced
    r = _detect([img, "--model", "demo", "--json", "--out", str(tmp_path / "o2")], env={"FORCE_COLOR": "1"})
    assert _plain_json(r.stdout)["images"] == 1
    clip = ROOT / "examples" / "clip.mp4"
    r = runner.invoke(app, ["video", str(clip), "--model", "demo", "--json", "--save-json", "--out", str(tmp_path / "v"),
                            "--imgsz", "128"], env={"FORCE_COLOR": "1"}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert _plain_json(r.stdout)["frames"] > 0

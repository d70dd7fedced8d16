"""Label Studio pre-labels: the writer and config on their own, then a round trip through a real
Label Studio server (``ddetr detect --format labelstudio`` -> project with the written config ->
import -> tasks read back with the SDK -> an image fetched through the local-files URL).

The server is the session's ``label_studio`` fixture (conftest.py, ``labelstudio_server.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from labelstudio_server import Server, run_sdk
from typer.testing import CliRunner

from ddetr_cli.cli import app
from ddetr_cli.formats.annotations import Instances
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.labelstudio import ImageURLError, LabelStudioWriter, image_url, labeling_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "images"
runner = CliRunner()


# -- without the server ---------------------------------------------------------------------------


def _labels(xml: str, tag: str = "RectangleLabels") -> list[str]:
    root = ET.fromstring(xml)
    return [lab.get("value") for ctl in root.iter(tag) for lab in ctl.iter("Label")]


def test_labeling_config_escapes_names():
    names = ["a & b", 'say "hi"', "<tag>", "it's", "", "plain", "plain"]
    xml = labeling_config(names)
    root = ET.fromstring(xml)
    assert root.tag == "View"
    [img] = root.iter("Image")
    assert (img.get("name"), img.get("value")) == ("image", "$image")
    [rect] = root.iter("RectangleLabels")
    assert (rect.get("name"), rect.get("toName")) == ("label", "image")
    assert _labels(xml) == ["a & b", 'say "hi"', "<tag>", "it's", "plain"]  # empty and repeated names once
    assert not list(root.iter("PolygonLabels"))
    xml = labeling_config(names, masks=True)
    [poly] = ET.fromstring(xml).iter("PolygonLabels")
    assert (poly.get("name"), poly.get("toName")) == ("polygon", "image")
    assert _labels(xml, "PolygonLabels") == _labels(xml)


def test_image_url(tmp_path):
    root = tmp_path / "root"
    (root / "sub dir").mkdir(parents=True)
    img = root / "sub dir" / "a&b #1%.jpg"
    img.write_bytes(b"x")
    assert image_url(str(img), root) == "/data/local-files/?d=sub%20dir/a%26b%20%231%25.jpg"
    assert image_url(str(img), root, prefix="http://h:8080/img/") == "http://h:8080/img/sub%20dir/a%26b%20%231%25.jpg"
    assert image_url("https://x.org/a.jpg?s=1", root) == "https://x.org/a.jpg?s=1"
    cwd = os.getcwd()
    try:
        os.chdir(root)  # the default root is the current directory
        assert image_url("sub dir/a&b #1%.jpg") == "/data/local-files/?d=sub%20dir/a%26b%20%231%25.jpg"
    finally:
        os.chdir(cwd)
    outside = tmp_path / "elsewhere.jpg"
    with pytest.raises(ImageURLError) as e:
        image_url(str(outside), root)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "\n" not in msg and str(outside) in msg and "outside" in msg


def test_writer_percent_clipping_scores_polygons(tmp_path):
    w = LabelStudioWriter("m1", url=lambda p: "u:" + p)
    boxes = [[20.0, 10.0, 70.0, 60.0], [-5.0, 90.0, 210.0, 130.0]]  # the second leaves the 200x100 image
    polys = [[[20.0, 10.0, 70.0, 10.0, 70.0, 60.0]], []]  # one triangle; an empty mask
    labels = LabelTable.from_names(["cat", "dog"])
    task = w.add("a.jpg", 200, 100, Instances(np.array(boxes), np.array([0, 1]), np.array([0.9, 0.5]), polys), labels)
    w.add("b.jpg", 50, 50, Instances(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0)), labels)
    assert task["data"] == {"image": "u:a.jpg", "ddetr_path": "a.jpg"}
    [pred] = task["predictions"]
    assert pred["model_version"] == "m1" and pred["score"] == pytest.approx(0.7)  # mean of the regions
    rect1, poly1, rect2 = pred["result"]  # no polygon for the empty mask
    assert rect1["value"] == {"x": 10.0, "y": 10.0, "width": 25.0, "height": 50.0, "rotation": 0, "rectanglelabels": ["cat"]}
    assert rect2["value"] == {"x": 0.0, "y": 90.0, "width": 100.0, "height": 10.0, "rotation": 0, "rectanglelabels": ["dog"]}
    assert (rect1["type"], rect1["from_name"], rect1["to_name"], rect1["score"]) == ("rectanglelabels", "label", "image", 0.9)
    assert (rect1["original_width"], rect1["original_height"]) == (200, 100)
    assert poly1["type"] == "polygonlabels" and poly1["from_name"] == "polygon" and poly1["score"] == 0.9
    assert poly1["value"]["polygonlabels"] == ["cat"]
    assert sorted(map(tuple, poly1["value"]["points"])) == [(10.0, 10.0), (35.0, 10.0), (35.0, 60.0)]
    assert len({r["id"] for r in w.tasks[0]["predictions"][0]["result"]}) == 3
    assert w.tasks[1]["predictions"][0] == {"model_version": "m1", "score": 0.0, "result": []}
    out = tmp_path / "o" / "labelstudio.json"
    w.write(out)
    assert json.loads(out.read_text()) == w.tasks
    assert sorted(p.name for p in out.parent.iterdir()) == ["labelstudio.json"]  # no temp file left


def test_detect_image_outside_root_one_line(tmp_path, tiny_model_path):
    img = tmp_path / "pics" / "a.jpg"
    img.parent.mkdir()
    shutil.copy(next(EXAMPLES.glob("*.jpg")), img)
    root = tmp_path / "root"
    root.mkdir()
    out = tmp_path / "run"
    r = runner.invoke(app, ["detect", str(img), "--model", str(tiny_model_path), "--out", str(out), "-q",
                            "--format", "coco,labelstudio", "--ls-root", str(root)])
    assert r.exit_code != 0
    msg = str(r.exception) if r.exception is not None and not isinstance(r.exception, SystemExit) else r.output
    assert "outside the Label Studio root" in msg and "\n" not in msg.strip()
    assert not (out / "labelstudio.json").exists() and not (out / "predictions.json").exists()
    # the console entry point prints it as one line, no traceback
    p = subprocess.run(
        [sys.executable, "-m", "ddetr_cli", "detect", str(img), "--model", str(tiny_model_path), "--out",
         str(tmp_path / "run2"), "-q", "--format", "labelstudio", "--ls-root", str(root)],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "outside the Label Studio root" in lines[0], p.stderr


# -- a real Label Studio server -------------------------------------------------------------------


def _sdk(server: Server, tmp_path: Path, config: str, tasks: Path, storage: Path | None) -> dict:
    return run_sdk(server, {"title": "ddetr pre-labels", "config": config, "tasks": str(tasks),
                            "storage": str(storage) if storage else None}, tmp_path)


def _get(server: Server, path: str) -> bytes:
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Token {server.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


@pytest.mark.slow
def test_detect_import_round_trip(label_studio: Server, tmp_path, monkeypatch):
    # images under the document root, one with characters that need URL quoting
    imgs = label_studio.root / "imgs"
    imgs.mkdir()
    srcs = sorted(EXAMPLES.glob("*.jpg"))[:4]
    for i, src in enumerate(srcs):
        shutil.copy(src, imgs / (f"shot {i} & #{i}.jpg" if i == 1 else src.name))
    out = tmp_path / "run"
    monkeypatch.chdir(label_studio.root)  # the default URL root: the current directory
    r = runner.invoke(app, ["detect", "imgs", "--model", "demo", "--conf", "0.3", "--out", str(out), "-q",
                            "--no-save-images", "--format", "coco,labelstudio"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    written = json.loads((out / "labelstudio.json").read_text())
    coco = json.loads((out / "predictions.json").read_text())
    config = (out / "labelstudio-config.xml").read_text()
    assert len(written) == len(srcs) == len(coco["images"])
    n_results = sum(len(t["predictions"][0]["result"]) for t in written)
    assert n_results == len(coco["annotations"]) > 0

    got = _sdk(label_studio, tmp_path, config, out / "labelstudio.json", imgs)
    assert _labels(got["label_config"]) == [c["name"] for c in coco["categories"]]
    allowed = set(_labels(got["label_config"]))
    assert len(got["tasks"]) == len(written) == len(got["imported_task_ids"])

    by_path = {t["data"]["ddetr_path"]: t for t in got["tasks"]}
    assert set(by_path) == {t["data"]["ddetr_path"] for t in written}
    images = {im["file_name"]: im for im in coco["images"]}
    cat_name = {c["id"]: c["name"] for c in coco["categories"]}
    for w in written:
        task = by_path[w["data"]["ddetr_path"]]
        assert task["data"]["image"] == w["data"]["image"]
        [pw], [pg] = w["predictions"], task["predictions"]
        assert pg["model_version"] == pw["model_version"] == coco["info"]["model"]
        assert pg["score"] == pytest.approx(pw["score"], abs=1e-6)
        assert len(pg["result"]) == len(pw["result"])
        im = images[Path(w["data"]["ddetr_path"]).name]
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(anns) == len(pg["result"])
        W, H = im["width"], im["height"]
        for rg, rw, ann in zip(pg["result"], pw["result"], anns):
            assert rg["id"] == rw["id"] and rg["type"] == "rectanglelabels"
            assert (rg["from_name"], rg["to_name"]) == ("label", "image")
            assert (rg["original_width"], rg["original_height"]) == (W, H)
            assert rg["score"] == pytest.approx(rw["score"], abs=1e-6)
            assert rg["score"] == pytest.approx(ann["score"], abs=1e-5)  # predictions.json keeps 5 decimals
            [name] = rg["value"]["rectanglelabels"]
            assert name in allowed and name == cat_name[ann["category_id"]]
            # predictions.json's box (pixels, 2 decimals) in percent; 0.011 px of its rounding allowed
            x, y, bw, bh = ann["bbox"]
            v = rg["value"]
            assert v["x"] == pytest.approx(100 * x / W, abs=100 * 0.011 / W)
            assert v["y"] == pytest.approx(100 * y / H, abs=100 * 0.011 / H)
            assert v["width"] == pytest.approx(100 * bw / W, abs=100 * 0.011 / W)
            assert v["height"] == pytest.approx(100 * bh / H, abs=100 * 0.011 / H)
            assert 0 <= v["x"] and v["x"] + v["width"] <= 100 + 1e-6 and 0 <= v["y"] and v["y"] + v["height"] <= 100 + 1e-6

    # the default image URL: Label Studio serves the file itself (local files, authenticated)
    for w in written:
        path = Path(w["data"]["ddetr_path"])
        if " " in path.name:  # the one whose URL needed quoting
            assert _get(label_studio, w["data"]["image"]) == (label_studio.root / path).read_bytes()
            break
    else:
        pytest.fail("no task for the image with a quoted name")


@pytest.mark.slow
def test_polygons_import(label_studio: Server, tmp_path):
    """Mask polygons (the --masks path) through the server: percent points read back unchanged."""
    import supervision as sv

    from ddetr_cli.formats.masks import instance_polygons

    H, W = 60, 80
    mask = np.zeros((2, H, W), bool)
    mask[0, 10:30, 5:25] = True
    mask[0, 15:20, 10:15] = False  # a hole: joined by a zero-width cut
    mask[1, 40:55, 50:78] = True
    mask[1, 5:12, 60:70] = True  # a second part of the same instance
    dets = sv.Detections(xyxy=np.array([[5, 10, 25, 30], [50, 5, 78, 55]], float), mask=mask,
                         confidence=np.array([0.8, 0.6]), class_id=np.array([0, 1]))
    w = LabelStudioWriter("poly-test", url=lambda p: image_url(p, label_studio.root))
    (label_studio.root / "poly").mkdir()
    img = label_studio.root / "poly" / "p.png"
    img.write_bytes(b"not served in this test")
    w.add(str(img), W, H, Instances.from_detections(dets, instance_polygons(dets)), LabelTable.from_names(["a", "b"]))
    w.write(tmp_path / "labelstudio.json")
    got = _sdk(label_studio, tmp_path, labeling_config(["a", "b"], masks=True), tmp_path / "labelstudio.json", None)
    [task] = got["tasks"]
    [pg], [pw] = task["predictions"], w.tasks[0]["predictions"]
    polys_g = [r for r in pg["result"] if r["type"] == "polygonlabels"]
    polys_w = [r for r in pw["result"] if r["type"] == "polygonlabels"]
    assert len(polys_g) == len(polys_w) == 2
    for rg, rw in zip(polys_g, polys_w):
        assert rg["value"]["polygonlabels"] == rw["value"]["polygonlabels"]
        assert set(rg["value"]["polygonlabels"]) <= set(_labels(got["label_config"], "PolygonLabels"))
        assert np.allclose(rg["value"]["points"], rw["value"]["points"], atol=1e-6)
        assert rg["score"] == pytest.approx(rw["score"], abs=1e-6)
    pts = np.array(polys_w[0]["value"]["points"]) / 100 * [W, H]  # back to pixels: the first mask's outline
    assert pts[:, 0].min() == pytest.approx(5) and pts[:, 0].max() == pytest.approx(25)
    assert pts[:, 1].min() == pytest.approx(10) and pts[:, 1].max() == pytest.approx(30)

"""``ddetr serve`` connected to a real Label Studio server as its ML backend.

Label Studio (the session's ``label_studio`` fixture) and ``ddetr serve --model demo`` run as
processes on 127.0.0.1. Through ``label-studio-sdk`` (``labelstudio_client.py``, in Label
Studio's venv) a project is created with a labeling config, its images are imported as tasks
(Label Studio's local-files URLs, which the backend fetches from Label Studio with its API key),
the backend is connected (Label Studio calls /health and /setup) and the Data Manager action
"Retrieve Predictions" is run (Label Studio calls /predict); then every task is read back with
its predictions. They are checked against the Detector on the same images: every detection,
its score, its box in percent, a label from the config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from labelstudio_server import Server, run_sdk

from ddetr_cli.data.images import read_image
from ddetr_cli.engine.predictor import Detector
from ddetr_cli.formats.labelstudio import image_url

ROOT = Path(__file__).resolve().parents[2]
IMAGES = sorted((ROOT / "examples" / "images").glob("*.jpg"))
NAMES = ["circle", "square", "triangle", "cross", "ring"]

pytestmark = pytest.mark.slow


def _config(labels: list[str]) -> str:
    """A config of a project's own: other tag names and image field than ddetr's."""
    body = "\n".join(f'    <Label value="{n}"/>' for n in labels)
    return (f'<View>\n  <Image name="photo" value="$picture"/>\n'
            f'  <RectangleLabels name="objects" toName="photo">\n{body}\n  </RectangleLabels>\n</View>\n')


def _tasks(server: Server, tmp_path: Path, folder: str) -> tuple[Path, list[Path]]:
    """The example images under the server's document root, as tasks with local-files URLs in
    ``picture``; and one task whose image does not exist."""
    imgs = server.root / folder
    imgs.mkdir()
    paths = []
    for p in IMAGES:
        shutil.copy(p, imgs / p.name)
        paths.append(imgs / p.name)
    tasks = [{"data": {"picture": image_url(str(p), server.root), "ddetr_path": str(p)}} for p in paths]
    tasks.append({"data": {"picture": image_url(str(imgs / "missing.jpg"), server.root), "ddetr_path": "missing"}})
    f = tmp_path / "tasks.json"
    f.write_text(json.dumps(tasks))
    return f, paths


def _check(got: dict, labels: list[str], det: Detector) -> int:
    """Every task with an image has one prediction, the Detector's detections of the image with
    classes in ``labels``; the task without an image has none. -> the number of regions."""
    assert got["ml_backend"]["error_message"] in (None, ""), got["ml_backend"]
    assert "Connected" in got["ml_backend"]["state"] or got["ml_backend"]["state"].endswith("CO"), got["ml_backend"]
    n = 0
    for task in got["tasks"]:
        path = task["data"]["ddetr_path"]
        if path == "missing":
            assert task["predictions"] == []
            continue
        [pred] = task["predictions"]
        assert pred["model_version"] == "demo"
        img = read_image(path)
        H, W = img.shape[:2]
        [d] = det.predict_arrays([img], 0.3)
        keep = [i for i, c in enumerate(d.class_id) if NAMES[c] in labels]
        assert len(pred["result"]) == len(keep)
        scores = [float(d.confidence[i]) for i in keep]
        assert pred["score"] == pytest.approx(np.mean(scores) if keep else 0.0, abs=1e-5)
        for r, i in zip(pred["result"], keep):
            assert (r["type"], r["from_name"], r["to_name"]) == ("rectanglelabels", "objects", "photo")
            assert r["value"]["rectanglelabels"] == [NAMES[d.class_id[i]]] and NAMES[d.class_id[i]] in labels
            assert r["score"] == pytest.approx(float(d.confidence[i]), abs=1e-5)
            x1, y1, x2, y2 = d.xyxy[i]
            v = r["value"]
            assert [v["x"], v["y"], v["width"], v["height"]] == pytest.approx(
                [100 * x1 / W, 100 * y1 / H, 100 * (x2 - x1) / W, 100 * (y2 - y1) / H], abs=1e-3)
        n += len(keep)
    return n


def test_label_studio_retrieves_predictions(label_studio: Server, start_serve, tmp_path):
    det = Detector.from_pretrained("demo", device="cpu")
    # 1. every class in the config; Label Studio's URL and key from the environment
    proc, url, log = start_serve("--model", "demo", "--device", "cpu",
                                 env={"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token})
    tasks, _ = _tasks(label_studio, tmp_path, "serve_all")
    got = run_sdk(label_studio, {"title": "ddetr serve", "config": _config(NAMES), "tasks": str(tasks),
                                 "storage": str(label_studio.root / "serve_all"), "ml_backend": url}, tmp_path)
    assert len(got["tasks"]) == len(IMAGES) + 1
    assert _check(got, NAMES, det) > 10
    text = log.read_text()
    assert "POST /setup" in text and "POST /predict" in text
    assert text.count("no prediction") == 1 and "missing.jpg" in text  # the task without an image, once
    assert "no label for" not in text

    # 2. a config with only some of the classes, and a backend started without Label Studio's URL
    # and key: it reads the images with what Label Studio sent to /setup
    proc2, url2, log2 = start_serve("--model", "demo", "--device", "cpu",
                                    env={"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""})
    some = ["square", "circle"]
    tasks, _ = _tasks(label_studio, tmp_path, "serve_some")
    got = run_sdk(label_studio, {"title": "ddetr serve, some classes", "config": _config(some), "tasks": str(tasks),
                                 "storage": str(label_studio.root / "serve_some"), "ml_backend": url2}, tmp_path)
    assert _check(got, some, det) > 0
    dropped = [ln for ln in log2.read_text().splitlines() if "no label for" in ln]
    assert len(dropped) == 1 and "triangle, cross, ring" in dropped[0]

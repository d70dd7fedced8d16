"""The Label Studio ML backend (``engine.ml_backend`` on ``engine.serve``'s FastAPI app) in process,
through HTTP requests to the app: the protocol, every kind of image source (local path, file://,
http, Label Studio's own URLs with its token or personal access token, served by real local HTTP
servers), labels matched to the config, batching, bad images and bad requests. The predictions
are checked against the Detector's own output on the same images, converted to percent here.

The round trip through a real Label Studio server is tests/engine/test_serve_labelstudio.py; the
load test (a real ``ddetr serve`` process) tests/engine/test_serve_load.py.
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from ddetr_cli.data.images import read_image
from ddetr_cli.data.transforms import resize_shape
from ddetr_cli.engine.ml_backend import LabelStudioBackend
from ddetr_cli.engine.predictor import Detector
from ddetr_cli.engine.serve import create_app
from ddetr_cli.formats.labelstudio import labeling_config

ROOT = Path(__file__).resolve().parents[2]
IMAGES = sorted((ROOT / "examples" / "images").glob("*.jpg"))
NAMES = ["circle", "square", "triangle", "cross", "ring"]


@pytest.fixture(scope="module")
def demo() -> Detector:
    return Detector.from_pretrained("demo", device="cpu")


@contextmanager
def client_for(detector, **kw) -> Iterator[tuple[TestClient, list[str]]]:
    """The app over a backend of ``detector`` (lifespan run), and the backend's log lines."""
    log: list[str] = []
    backend = LabelStudioBackend(detector, kw.pop("model_version", "demo"), log=log.append, **kw)
    with TestClient(create_app(backend)) as client:
        yield client, log


_REFERENCE: dict[tuple, tuple] = {}


def expected(det: Detector, path: Path, conf: float = 0.3, names: dict[str, str] | None = None) -> list[tuple]:
    """The reference: the Detector on the image alone -> (label, score, x, y, w, h in percent),
    renamed by ``names`` (classes missing from it dropped)."""
    key = (id(det), path, conf)
    if key not in _REFERENCE:
        img = read_image(path)
        _REFERENCE[key] = (img.shape[:2], det.predict_arrays([img], conf)[0])
    (H, W), d = _REFERENCE[key]
    out = []
    for (x1, y1, x2, y2), c, s in zip(d.xyxy, d.class_id, d.confidence):
        name = det.labels.name(int(c))
        name = names.get(name) if names is not None else name
        if name is not None:
            out.append((name, float(s), 100 * x1 / W, 100 * y1 / H, 100 * (x2 - x1) / W, 100 * (y2 - y1) / H))
    return out


def check_prediction(pred: dict, want: list[tuple], size: tuple[int, int], from_name="label", to_name="image",
                     model_version="demo") -> None:
    W, H = size
    assert pred["model_version"] == model_version
    rects = [r for r in pred["result"] if r["type"] == "rectanglelabels"]
    assert len(rects) == len(want) == len(pred["result"])
    assert pred["score"] == pytest.approx(np.mean([w[1] for w in want]) if want else 0.0, abs=1e-5)
    for r, (name, score, x, y, w, h) in zip(rects, want):
        assert (r["from_name"], r["to_name"], r["original_width"], r["original_height"]) == (from_name, to_name, W, H)
        assert r["value"]["rectanglelabels"] == [name]
        assert r["score"] == pytest.approx(score, abs=1e-5)
        v = r["value"]
        assert [v["x"], v["y"], v["width"], v["height"]] == pytest.approx([x, y, w, h], abs=1e-4)
    assert len({r["id"] for r in pred["result"]}) == len(pred["result"])


# -- local HTTP servers: plain files, and a stand-in for Label Studio's own URLs ------------------


class Files(http.server.ThreadingHTTPServer):
    """Serves IMAGES by name at ``/img/<name>``; with a ``token`` (and ``jwt`` access tokens), only
    to requests that carry it (401 otherwise), as Label Studio does. ``/data/upload/<name>``
    redirects to ``/img/<name>``: Label Studio's redirect to a presigned storage URL, which must
    not get the key. ``/api/token/refresh/`` answers a refresh token with an access token.
    Records every request's path and Authorization header."""

    def __init__(self, token: str | None = None, refresh: str | None = None) -> None:
        self.token, self.refresh, self.seen = token, refresh, []
        self.access = "eyJhbGciOiJIUzI1NiJ9." + base64.urlsafe_b64encode(json.dumps(
            {"token_type": "access", "exp": int(time.time()) + 3600}).encode()).decode().rstrip("=") + ".sig"
        files = {p.name: p.read_bytes() for p in IMAGES}
        files["corrupt.jpg"] = IMAGES[0].read_bytes()[:300]
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: bytes = b"", ctype="image/jpeg", headers=()) -> None:
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.seen.append((self.path, self.headers.get("Authorization")))
                if self.path == "/api/token/refresh/" and json.loads(body).get("refresh") == outer.refresh:
                    return self._send(200, json.dumps({"access": outer.access}).encode(), "application/json")
                self._send(401)

            def do_GET(self):
                auth = self.headers.get("Authorization")
                outer.seen.append((self.path, auth))
                path = urllib.parse.urlsplit(self.path)
                if path.path.startswith("/data/upload/"):
                    if outer.token and auth != f"Token {outer.token}":
                        return self._send(401)
                    return self._send(302, headers=[("Location", "/img/" + path.path.rsplit("/", 1)[1])])
                if path.path == "/data/local-files/":
                    if outer.refresh and auth != f"Bearer {outer.access}" or outer.token and auth != f"Token {outer.token}":
                        return self._send(401)
                    name = urllib.parse.parse_qs(path.query)["d"][0].rsplit("/", 1)[-1]
                    return self._send(200, files[name]) if name in files else self._send(404)
                if path.path.startswith("/img/"):
                    name = path.path.rsplit("/", 1)[1]
                    return self._send(200, files[name]) if name in files else self._send(404)
                self._send(404)

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


# -- the protocol ---------------------------------------------------------------------------------


def test_health_setup_versions_webhook(demo):
    with client_for(demo, model_version="demo-v1") as (c, log):
        r = c.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "UP" and r.json()["model_version"] == "demo-v1"
        r = c.post("/setup", json={"project": "7.1700000000", "schema": labeling_config(NAMES), "hostname": "http://x",
                                   "access_token": "t"})
        assert r.status_code == 200 and r.json() == {"model_version": "demo-v1"}
        assert c.get("/versions").json() == {"versions": ["demo-v1"]}
        r = c.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        # a config with nothing to predict is refused at connection time, with one line
        r = c.post("/setup", json={"project": "8.1", "schema": "<View><Text name='t' value='$text'/></View>"})
        assert r.status_code == 422 and "RectangleLabels" in r.json()["error"] and "\n" not in r.json()["error"]
    assert log == []


def test_predict_every_source_against_the_detector(demo, tmp_path):
    """Local path, file:// URL, http URL: each task's prediction is the Detector's detections of
    its image, in percent, with per-region and per-task scores; a request without a config gets
    the config ``ddetr detect --format labelstudio`` writes."""
    spaced = tmp_path / "a dir" / "shot #1.jpg"
    spaced.parent.mkdir()
    spaced.write_bytes(IMAGES[1].read_bytes())
    with Files() as files, client_for(demo) as (c, log):
        tasks = [
            {"id": 1, "data": {"image": str(IMAGES[0])}},
            {"id": 2, "data": {"image": spaced.as_uri()}},  # file:// with quoted characters
            {"id": 3, "data": {"image": f"{files.url}/img/{IMAGES[2].name}"}},
        ]
        r = c.post("/predict", json={"tasks": tasks, "label_config": labeling_config(NAMES), "project": "1.1"})
        assert r.status_code == 200
        results = r.json()["results"]
        [alone] = c.post("/predict", json={"tasks": tasks[:1]}).json()["results"]  # no label_config: the model's own
    assert len(results) == 3
    for pred, path in zip(results, [IMAGES[0], IMAGES[1], IMAGES[2]]):
        h, w = read_image(path).shape[:2]
        check_prediction(pred, expected(demo, path), (w, h))
    check_prediction(alone, expected(demo, IMAGES[0]), read_image(IMAGES[0]).shape[1::-1])
    assert sum(len(p["result"]) for p in results) > 5
    assert log == []


def test_label_studio_urls_with_token_and_redirect(demo):
    """Label Studio's own URLs (relative, or absolute on its host) are fetched with its API key;
    a redirect (to a presigned storage URL) is followed without the key."""
    with Files(token="secret-token") as ls, client_for(demo, label_studio_url=ls.url, api_key="secret-token") as (c, log):
        tasks = [
            {"id": 1, "data": {"image": f"/data/local-files/?d=imgs/{IMAGES[0].name}"}},
            {"id": 2, "data": {"image": f"{ls.url}/data/upload/3/{IMAGES[1].name}"}},
        ]
        r = c.post("/predict", json={"tasks": tasks, "label_config": labeling_config(NAMES)})
    assert r.status_code == 200 and log == []
    for pred, path in zip(r.json()["results"], IMAGES[:2]):
        h, w = read_image(path).shape[:2]
        check_prediction(pred, expected(demo, path), (w, h))
    auth = dict(ls.seen)
    assert auth[f"/data/local-files/?d=imgs/{IMAGES[0].name}"] == "Token secret-token"
    assert auth[f"/data/upload/3/{IMAGES[1].name}"] == "Token secret-token"
    assert auth[f"/img/{IMAGES[1].name}"] is None  # the redirect target never sees the key


def test_label_studio_personal_access_token_and_setup_fallback(demo):
    """A personal access token (a JWT refresh token) is exchanged for an access token (Bearer);
    without a URL and key, the hostname and token Label Studio sent to /setup are used."""
    refresh = "eyJhbGciOiJIUzI1NiJ9." + base64.urlsafe_b64encode(json.dumps(
        {"token_type": "refresh", "exp": int(time.time()) + 86400}).encode()).decode().rstrip("=") + ".sig"
    task = {"id": 1, "data": {"image": f"/data/local-files/?d={IMAGES[3].name}"}}
    h, w = read_image(IMAGES[3]).shape[:2]
    with Files(refresh=refresh) as ls, client_for(demo, label_studio_url=ls.url, api_key=refresh) as (c, log):
        for _ in range(2):
            [pred] = c.post("/predict", json={"tasks": [task]}).json()["results"]
            check_prediction(pred, expected(demo, IMAGES[3]), (w, h))
        assert [p for p, _ in ls.seen].count("/api/token/refresh/") == 1  # the access token is reused
        assert ls.seen[-1][1] == f"Bearer {ls.access}"
    with Files(token="project-token") as ls, client_for(demo) as (c, log):
        # before /setup: no Label Studio to fetch from -> no prediction, one line saying what to set
        assert c.post("/predict", json={"tasks": [task], "project": "5.17"}).json()["results"] == [[]]
        assert len(log) == 1 and "LABEL_STUDIO_URL" in log[0]
        c.post("/setup", json={"project": "5.17", "schema": labeling_config(NAMES), "hostname": ls.url,
                               "access_token": "project-token"})
        [pred] = c.post("/predict", json={"tasks": [task], "project": "5.17"}).json()["results"]
        check_prediction(pred, expected(demo, IMAGES[3]), (w, h))
        assert ls.seen[-1] == (f"/data/local-files/?d={IMAGES[3].name}", "Token project-token")


def test_bad_images_get_no_prediction_not_a_500(demo, tmp_path):
    (tmp_path / "not_an_image.jpg").write_text("hello")
    with Files() as files, client_for(demo) as (c, log):
        tasks = [
            {"id": 10, "data": {"image": str(IMAGES[0])}},
            {"id": 11, "data": {"image": str(tmp_path / "missing.jpg")}},
            {"id": 12, "data": {"image": str(tmp_path / "not_an_image.jpg")}},
            {"id": 13, "data": {"image": f"{files.url}/img/corrupt.jpg"}},
            {"id": 14, "data": {"image": f"{files.url}/img/nothing.jpg"}},  # 404
            {"id": 15, "data": {"image": "http://127.0.0.1:9/x.jpg"}},  # nothing listens
            {"id": 16, "data": {"text": "no image field"}},
            {"id": 17, "data": {"image": "s3://bucket/key.jpg"}},  # cloud storage, no Label Studio given
            {"id": 18},
            {"id": 19, "data": {"image": str(IMAGES[1])}},
        ]
        r = c.post("/predict", json={"tasks": tasks, "label_config": labeling_config(NAMES)})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == len(tasks)
    assert all(res == [] for res in results[1:-1])
    for pred, path in [(results[0], IMAGES[0]), (results[-1], IMAGES[1])]:
        h, w = read_image(path).shape[:2]
        check_prediction(pred, expected(demo, path), (w, h))
    assert len(log) == len(tasks) - 2
    assert all("\n" not in line and "no prediction" in line for line in log)
    assert sorted(int(line.split()[1].rstrip(":")) for line in log) == list(range(11, 19))


def test_bad_requests(demo):
    with client_for(demo) as (c, log):
        r = c.post("/predict", content=b"{not json")
        assert r.status_code == 400 and "not JSON" in r.json()["error"]
        r = c.post("/predict", json={"tasks": "x"})
        assert r.status_code == 400 and "tasks" in r.json()["error"]
        r = c.post("/predict", json={"tasks": [], "label_config": "<View><Image"})
        assert r.status_code == 422 and "not valid XML" in r.json()["error"]
        only_polygons = labeling_config(NAMES, masks=True).replace("RectangleLabels", "Choices")
        r = c.post("/predict", json={"tasks": [{"data": {"image": str(IMAGES[0])}}], "label_config": only_polygons})
        assert r.status_code == 422 and "--masks" in r.json()["error"]
        assert c.post("/predict", json={"tasks": []}).json() == {"results": []}
        r = c.post("/predict", json={"tasks": [{"data": {"image": str(IMAGES[0])}}], "label_config": labeling_config(["dog", "cat"])})
        assert r.status_code == 422 and "none of the model's classes (circle, square" in r.json()["error"]


def test_labels_matched_to_the_config_by_name(demo):
    """A config of its own (names of tags and the image field, Labels by case and by
    predicted_values, two classes missing): regions use its names, the missing classes are
    dropped and reported once however many requests."""
    config = """<View>
  <Header value="Shapes"/>
  <Image name="photo" value="$picture" zoom="true"/>
  <RectangleLabels name="shapes" toName="photo">
    <Label value="Circle" background="red"/>
    <Label value="box" predicted_values="square, cube"/>
    <Label value="Triangle"/>
    <Label value="dog"/>
  </RectangleLabels>
</View>"""
    names = {"circle": "Circle", "square": "box", "triangle": "Triangle"}
    tasks = [{"id": i, "data": {"picture": str(p)}} for i, p in enumerate(IMAGES[:3])]
    with client_for(demo) as (c, log):
        r = c.post("/predict", json={"tasks": tasks, "label_config": config})
        assert r.status_code == 200
        assert c.post("/predict", json={"tasks": tasks[:1], "label_config": config}).json()["results"][0]["result"]
        c.post("/setup", json={"project": "2.2", "schema": config})
    n = 0
    for pred, path in zip(r.json()["results"], IMAGES[:3]):
        h, w = read_image(path).shape[:2]
        want = expected(demo, path, names=names)
        check_prediction(pred, want, (w, h), from_name="shapes", to_name="photo")
        n += len(want)
    assert n > 0 and len(expected(demo, IMAGES[1])) > len(expected(demo, IMAGES[1], names=names))  # some were dropped
    assert len(log) == 1 and "cross, ring" in log[0] and "circle" not in log[0]
    # classes left out by --classes are not reported missing
    with client_for(demo, classes=[0, 1]) as (c, log):
        [pred] = c.post("/predict", json={"tasks": tasks[:1], "label_config": config}).json()["results"]
    assert log == [] and {r["value"]["rectanglelabels"][0] for r in pred["result"]} <= {"Circle", "box"}


def test_classes_conf_and_batches(demo, monkeypatch):
    """--classes and --conf reach the model; a request's images that the model resizes to one
    shape go through it together, ``batch`` at a time, never padded, so each task's answer is
    the one its image gets alone."""
    calls = []
    real = demo.predict_arrays

    def spy(images, conf=0.3, max_det=100, classes=None):
        calls.append(([im.shape[:2] for im in images], conf, classes))
        return real(images, conf, max_det, classes)

    paths = IMAGES[:3] + IMAGES[:2]  # 320x240 and 640x480 both resize to 256x341: four images of one shape
    tasks = [{"id": i, "data": {"image": str(p)}} for i, p in enumerate(paths)]
    with client_for(demo, batch=4, conf=0.5, classes=[0, 1]) as (c, log):
        monkeypatch.setattr(demo, "predict_arrays", spy)
        results = c.post("/predict", json={"tasks": tasks}).json()["results"]
        monkeypatch.undo()
    assert sorted(len(shapes) for shapes, _, _ in calls) == [1, 4]
    for shapes, conf, classes in calls:
        assert conf == 0.5 and classes == [0, 1]
        assert len({resize_shape(h, w, demo.imgsz, demo.max_size) for h, w in shapes}) == 1
    names = {"circle": "circle", "square": "square"}
    for pred, path in zip(results, paths):
        h, w = read_image(path).shape[:2]
        check_prediction(pred, expected(demo, path, conf=0.5, names=names), (w, h))
    assert sum(len(p["result"]) for p in results) > 0


def _ls_polygon_mask(points: list[list[float]], w: int, h: int) -> np.ndarray:
    xy = (np.asarray(points) / 100.0 * [w, h]).ravel().tolist()
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([xy], h, w))).astype(bool)


def test_masks_polygons(tiny_mask_model_path):
    """--masks with a mask-head model: each detection's polygon (percent) covers the mask the
    Detector predicts (IoU >= 0.9 after the round trip through percent and pycocotools)."""
    det = Detector.from_pretrained(str(tiny_mask_model_path), device="cpu", imgsz=96)
    config = labeling_config(NAMES, masks=True)
    tasks = [{"id": i, "data": {"image": str(p)}} for i, p in enumerate(IMAGES[:2])]
    with client_for(det, masks=True, conf=0.05, batch=1) as (c, log):
        results = c.post("/predict", json={"tasks": tasks, "label_config": config}).json()["results"]
    n = 0
    for pred, path in zip(results, IMAGES[:2]):
        img = read_image(path)
        h, w = img.shape[:2]
        [d] = det.predict_arrays([img], 0.05)
        rects = [r for r in pred["result"] if r["type"] == "rectanglelabels"]
        polys = {r["id"].replace("p", "r"): r for r in pred["result"] if r["type"] == "polygonlabels"}
        assert len(rects) == len(d) > 0
        for r, m, c_ in zip(rects, d.mask, d.class_id):
            if not m.any():
                assert r["id"] not in polys
                continue
            p = polys[r["id"]]
            assert p["from_name"] == "polygon" and p["value"]["polygonlabels"] == [NAMES[c_]] and p["score"] == r["score"]
            got = _ls_polygon_mask(p["value"]["points"], w, h)
            assert (got & m).sum() / (got | m).sum() >= 0.9
            n += 1
    assert n > 0
    # without PolygonLabels in the config, rectangles only
    with client_for(det, masks=True, conf=0.05) as (c, log):
        results = c.post("/predict", json={"tasks": tasks, "label_config": labeling_config(NAMES)}).json()["results"]
    assert {r["type"] for p in results for r in p["result"]} == {"rectanglelabels"}


@pytest.mark.parametrize("case", ["port in use", "unknown model", "masks without a mask head"])
def test_cli_failures_are_one_line(case):
    """``ddetr serve`` that cannot start: exit 2 and one ``error:`` line, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        args = {"port in use": ["--model", "demo", "--port", str(busy.getsockname()[1])],
                "unknown model": ["--model", "no-such-model", "--port", "0"],
                "masks without a mask head": ["--model", "demo", "--masks", "--port", "0"]}[case]
        p = subprocess.run([sys.executable, "-m", "ddetr_cli", "serve", *args], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert {"port in use": "cannot listen", "unknown model": "no-such-model", "masks without a mask head": "mask head"}[case] in lines[0]

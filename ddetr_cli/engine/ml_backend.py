"""Label Studio's ML backend protocol over a Detector (``ddetr serve``; ``engine.serve`` puts it on HTTP).

Label Studio speaks to an "ML backend" over HTTP (JSON bodies):

- ``GET /health`` -> ``{"status": "UP", ...}`` (answered within Label Studio's 1 s timeout, also
  while a prediction runs: the model runs in its own thread, never on the event loop);
- ``POST /setup`` ``{"project": "<id>.<created>", "schema": <labeling config>, "hostname",
  "access_token", ...}`` -> ``{"model_version": ...}``; a config with nothing to predict
  (no ``RectangleLabels`` / ``PolygonLabels`` on an ``Image``) is refused (422) with one line;
- ``POST /predict`` ``{"tasks": [...], "label_config", "project", ...}`` -> ``{"results": [...]}``,
  one entry per task in order: a prediction ``{"result", "score", "model_version"}`` (see
  ``formats.labelstudio.prediction``), or ``[]`` (no prediction) for a task whose image cannot
  be read, which is logged; the other tasks are still answered (200);
- ``POST /webhook`` -> ``{"status": "ok"}`` (acknowledged; nothing is trained).

Images: a task's image field (the ``Image`` tag's ``$field``) holds a local path, a ``file://``
URL, an http(s) URL, a Label Studio path (``/data/local-files/?d=...``, ``/data/upload/...``) or a
cloud URI (``s3://``, ``gs://``, ``azure-blob://``: fetched through Label Studio's
``/tasks/<id>/resolve/``). Label Studio's own URLs are fetched with ``Authorization`` from its
URL and API key (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``; a personal access token, a JWT,
is exchanged for an access token first) or, when those are not given, the ``hostname`` and
``access_token`` Label Studio sent to ``/setup`` for the project.

Labels: each model class is written under the config's Label of the same name (then: same but
for case, then a Label listing it in ``predicted_values``); classes the config lacks are
dropped and logged once per config.

A request's images are read in worker threads; the model runs one call at a time, on the
request's images that it resizes to one shape together (``batch`` at most; never padded, so a
task's prediction is the one its image gets alone).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddetr_cli.data.images import ImageReadError, read_image
from ddetr_cli.data.sources import fetch_url
from ddetr_cli.engine.predictor import Detector
from ddetr_cli.formats.annotations import Instances
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.labelstudio import (
    LabelingConfigError,
    LabelingTargets,
    config_label_table,
    labeling_config,
    prediction,
    read_labeling_config,
)
from ddetr_cli.formats.masks import instance_polygons

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://", "azure-spi://")


class RequestError(ValueError):
    """A request the backend cannot answer at all (not JSON, no tasks: 400; a labeling config
    with nothing to predict: 422); the message is one line."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# -- Label Studio's own URLs ---------------------------------------------------------------------


def _jwt_claims(token: str) -> dict | None:
    """The (unverified) claims of a JWT, or None when ``token`` is not one (a legacy API token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """Requests to a Label Studio server: its base URL and the ``Authorization`` header for an API
    key: ``Token <key>`` for a legacy token; a personal access token (a JWT refresh token) is
    exchanged at ``/api/token/refresh/`` for a short-lived access token (``Bearer``), renewed
    shortly before it expires."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 20.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key or ""
        self.timeout = timeout
        claims = _jwt_claims(self.api_key)
        self.jwt = claims is not None and claims.get("token_type") == "refresh"
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not self.jwt:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if self._access is None or self._access[1] < time.time() + 30:
                self._access = self._refresh()
            return {"Authorization": f"Bearer {self._access[0]}"}

    def _refresh(self) -> tuple[str, float]:
        req = urllib.request.Request(f"{self.url}/api/token/refresh/", data=json.dumps({"refresh": self.api_key}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                access = json.loads(r.read())["access"]
        except (OSError, ValueError, KeyError) as e:
            raise ImageReadError(f"{self.url}: cannot exchange the API key for an access token ({e})") from None
        exp = (_jwt_claims(access) or {}).get("exp")
        return access, float(exp) if exp else time.time() + 60

    def owns(self, url: str) -> bool:
        """Whether ``url`` is on this server (so it gets the key)."""
        a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(self.url)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def _fetch_with_auth(url: str, auth: LabelStudioAuth) -> np.ndarray:
    """GET an image from Label Studio; the key goes to Label Studio only, never to the presigned
    storage URL it may redirect to (``fetch_url`` does not forward headers on a redirect)."""
    return fetch_url(url, timeout=auth.timeout, headers=auth.headers())


# -- the backend -----------------------------------------------------------------------------------


@dataclass
class Targets:
    """A project's config as the backend uses it: where regions go and the label tables for them."""

    config: LabelingTargets
    rect_labels: LabelTable | None
    poly_labels: LabelTable | None
    dropped: tuple[str, ...]


class LabelStudioBackend:
    """The ML backend's protocol over a :class:`Detector`, without HTTP (``create_app`` serves it).

    ``conf``, ``classes`` (label indices), ``max_det``: as ``Detector.predict_arrays``. ``masks``:
    polygons for ``PolygonLabels`` (a model with a mask head). ``label_studio_url`` /
    ``api_key``: where Label Studio's own image URLs are fetched from. ``log``: one line per event
    worth a person's attention (a dropped class, an unreadable image).
    """

    def __init__(self, detector: Detector, model_version: str, *, conf: float = 0.3, classes: Sequence[int] | None = None,
                 max_det: int = 100, masks: bool = False, batch: int = 4, workers: int = 4,
                 label_studio_url: str | None = None, api_key: str | None = None, fetch_timeout: float = 20.0,
                 log: Callable[[str], None] = print) -> None:
        self.detector = detector
        self.model_version = model_version
        self.conf, self.classes, self.max_det, self.masks = conf, classes, max_det, masks
        self.batch = max(1, batch)
        self.fetch_timeout = fetch_timeout
        self.log = log
        self.label_studio = LabelStudioAuth(label_studio_url, api_key, fetch_timeout) if label_studio_url else None
        self._projects: dict[str, LabelStudioAuth] = {}  # project id -> what /setup said (without the env)
        self._reported: set[tuple] = set()
        self._lock = threading.Lock()
        # one model call at a time (torch uses every core for one call; two would only contend),
        # image reading in a few threads beside it
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="ddetr-model")
        self.io_pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ddetr-read")

    def close(self) -> None:
        self.io_pool.shutdown(wait=True, cancel_futures=True)
        self.model_pool.shutdown(wait=True, cancel_futures=True)

    # -- protocol ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"status": "UP", "model_class": "ddetr", "model_version": self.model_version}

    def setup(self, body: dict) -> dict[str, Any]:
        """Checks the project's config (``schema``) and remembers the ``hostname`` /
        ``access_token`` Label Studio sent, for its image URLs when no URL and key were given."""
        project = _project_id(body.get("project"))
        if project and body.get("hostname") and body.get("access_token"):
            with self._lock:
                self._projects[project] = LabelStudioAuth(str(body["hostname"]), str(body["access_token"]), self.fetch_timeout)
        if body.get("schema"):
            self.targets(str(body["schema"]))
        return {"model_version": self.model_version}

    def targets(self, label_config: str | None) -> Targets:
        """A config -> where regions go; logs once per config the model classes it drops. Without
        a config, the one ``ddetr detect --format labelstudio`` writes for this model."""
        xml = label_config or labeling_config(self.detector.labels.names, self.masks)
        t = _targets(xml, self.detector.labels, self.masks, tuple(self.classes) if self.classes is not None else None)
        key = (t.config.rectangles, t.config.polygons)
        with self._lock:
            first = key not in self._reported
            self._reported.add(key)
        if first and t.dropped:
            self.log(f"the labeling config has no label for {', '.join(t.dropped)}: "
                     f"{'that class is' if len(t.dropped) == 1 else 'those classes are'} not predicted")
        return t

    def image_source(self, task: dict, field: str, project: str | None) -> tuple[str, Callable[[], np.ndarray]]:
        """A task -> (what its image is, for messages; a reader of the image). Raises ImageReadError."""
        data = task.get("data")
        value = data.get(field) if isinstance(data, dict) else None
        if not isinstance(value, str) or not value:
            raise ImageReadError(f"task data has no image field {field!r}")
        if value.startswith("file://"):
            path = urllib.parse.unquote(urllib.parse.urlsplit(value).path)
            return path, functools.partial(read_image, path)
        auth = self.label_studio or (self._projects.get(project) if project else None)
        if value.startswith(("http://", "https://")):
            if auth is not None and auth.owns(value):
                return value, functools.partial(_fetch_with_auth, value, auth)
            return value, functools.partial(fetch_url, value, self.fetch_timeout)
        if value.startswith(CLOUD_SCHEMES):
            if auth is None or task.get("id") is None:
                raise ImageReadError(f"{value}: a cloud storage URI is read through Label Studio: "
                                     "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
            uri = base64.urlsafe_b64encode(value.encode()).decode()
            url = f"{auth.url}/tasks/{int(task['id'])}/resolve/?fileuri={urllib.parse.quote(uri)}"
            return value, functools.partial(_fetch_with_auth, url, auth)
        if value.startswith("/") and not Path(value).is_file() and auth is not None:
            return value, functools.partial(_fetch_with_auth, auth.url + value, auth)
        if value.startswith(("/data/", "/tasks/", "/storage-data/")) and not Path(value).is_file():
            raise ImageReadError(f"{value}: a Label Studio URL, and no Label Studio to fetch it from: "
                                 "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        return value, functools.partial(read_image, os.path.expanduser(value))

    def read_images(self, tasks: Sequence[dict], field: str, project: str | None) -> list[np.ndarray | str]:
        """Each task's image (RGB uint8), or the one-line reason it could not be read (logged)."""
        def one(task: dict) -> np.ndarray | str:
            name = "?"
            try:
                name, reader = self.image_source(task, field, project)
                return reader()
            except ImageReadError as e:
                why = str(e)
            except Exception as e:  # noqa: BLE001 - one task's failure must not fail the others
                why = f"{name}: {type(e).__name__}: {e}"
            self.log(f"task {task.get('id', '?')}: no prediction: {why}")
            return why

        return list(self.io_pool.map(one, tasks))

    def detect(self, images: Sequence[np.ndarray]) -> list[Instances]:
        """Images -> detections (with polygons when ``masks``). Images that the model resizes to
        the same shape go through it together, ``batch`` at a time; others alone, since padding
        an image to its batch's size changes its detections (the model sees the padding).
        Call from one thread at a time (``model_pool``)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self.detector.input_shape(*im.shape[:2]), []).append(i)
        out: list[Instances | None] = [None] * len(images)
        for group in groups.values():
            for start in range(0, len(group), self.batch):
                idx = group[start : start + self.batch]
                dets = self.detector.predict_arrays([images[i] for i in idx], self.conf, self.max_det, self.classes)
                for i, d in zip(idx, dets):
                    out[i] = Instances.from_detections(d, instance_polygons(d) if self.masks else None)
        return out  # type: ignore[return-value]

    def predictions(self, tasks: Sequence[dict], images: Sequence[np.ndarray | str], targets: Targets) -> list[Any]:
        """Detections of the readable images -> the ``results`` list: a prediction per task, ``[]``
        for a task without an image. Runs in the model thread."""
        ok = [i for i, im in enumerate(images) if isinstance(im, np.ndarray)]
        dets = self.detect([images[i] for i in ok])
        results: list[Any] = [[] for _ in tasks]
        cfg = targets.config
        for i, inst in zip(ok, dets):
            h, w = images[i].shape[:2]
            results[i] = prediction(
                inst, targets.rect_labels if targets.rect_labels is not None else targets.poly_labels, w, h,
                self.model_version,
                from_name=cfg.rectangles.from_name if targets.rect_labels is not None else None, to_name=cfg.to_name,
                polygon_name=cfg.polygons.from_name if targets.poly_labels is not None else None,
                polygon_labels=targets.poly_labels, id_prefix=f"t{tasks[i].get('id', i + 1)}",
            )
        return results

    def parse_predict(self, body: Any) -> tuple[list[dict], Targets, str | None]:
        if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
            raise RequestError('expected a JSON object with a "tasks" list')
        tasks = [t if isinstance(t, dict) else {} for t in body["tasks"]]
        return tasks, self.targets(body.get("label_config")), _project_id(body.get("project"))

    def predict(self, body: Any) -> dict[str, Any]:
        """The whole ``/predict`` in the calling thread (the HTTP app spreads it over its pools)."""
        tasks, targets, project = self.parse_predict(body)
        images = self.read_images(tasks, targets.config.image_field, project)
        return {"results": self.predictions(tasks, images, targets)}


def _project_id(value: Any) -> str | None:
    """Label Studio's ``"<id>.<created timestamp>"`` -> ``"<id>"``."""
    return str(value).split(".")[0] if value not in (None, "") else None


@functools.lru_cache(maxsize=64)
def _targets(xml: str, labels: LabelTable, masks: bool, classes: tuple[int, ...] | None) -> Targets:
    """A config -> Targets; ``dropped``: the classes asked for (``classes``, default all) that it lacks."""
    try:
        cfg = read_labeling_config(xml)
    except LabelingConfigError as e:
        raise RequestError(str(e), 422) from None
    rect = config_label_table(labels, cfg.rectangles)[0] if cfg.rectangles is not None else None
    poly = config_label_table(labels, cfg.polygons)[0] if cfg.polygons is not None and masks else None
    if rect is None and poly is None:
        raise RequestError("the labeling config has only PolygonLabels: start ddetr serve with --masks (and a model with a "
                           "mask head) to predict polygons, or add RectangleLabels", 422)
    used = [t for t in (rect, poly) if t is not None]
    dropped = [c.name for c in labels if (classes is None or c.label in classes) and all(t.get(c.label) is None for t in used)]
    asked = [c.name for c in labels if classes is None or c.label in classes]
    if len(dropped) == len(asked):
        raise RequestError(f"the labeling config has none of the model's classes ({', '.join(asked)}): name its Labels "
                           "after them, or list them in a Label's predicted_values", 422)
    return Targets(cfg, rect, poly, tuple(dropped))

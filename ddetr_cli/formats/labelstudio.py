"""Label Studio pre-labels: tasks with predictions (``labelstudio.json``) and a labeling config.

Label Studio imports a JSON list of tasks; each task names its image by URL in ``data`` and may
carry ``predictions``: regions in *percent* of the image (``x``, ``y``, ``width``, ``height`` of a
rectangle; polygon ``points``), each with its ``score``. A region's ``from_name`` / ``to_name``
must be the ``name`` of a control tag (``RectangleLabels``) and of the ``Image`` tag in the
project's labeling config, and its label one of that tag's ``Label`` values: ``labeling_config``
writes the matching config.

Images on this machine are served by Label Studio itself ("local files") under
``/data/local-files/?d=<path relative to the document root>``, which needs the server started
with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<root>``, and a Local Files storage of the project whose
path is a folder above the images (it need not be synced). Images served elsewhere take a URL
prefix instead (``prefix`` + path relative to the root); http(s) sources keep their URL.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from ddetr_cli.files import atomic_write_text
from ddetr_cli.formats.annotations import Instances
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.masks import join_polygons

LOCAL_FILES_PREFIX = "/data/local-files/?d="


class ImageURLError(ValueError):
    """An image that cannot be named by a URL Label Studio can load; the message is one line."""


def labeling_config(names: Sequence[str], masks: bool = False, *, from_name: str = "label",
                    to_name: str = "image", polygon_name: str = "polygon") -> str:
    """A Label Studio labeling config (XML) with one ``Label`` per name (empty names skipped,
    duplicates once): rectangles, and with ``masks`` also polygons, on the ``$image`` field."""
    labels, seen = [], set()
    for n in names:
        if n and n not in seen:
            seen.add(n)
            labels.append(f"    <Label value={quoteattr(n)}/>")
    body = "\n".join(labels)
    parts = [
        "<View>",
        f"  <Image name={quoteattr(to_name)} value=\"$image\"/>",
        f"  <RectangleLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n{body}\n  </RectangleLabels>",
    ]
    if masks:
        parts.append(f"  <PolygonLabels name={quoteattr(polygon_name)} toName={quoteattr(to_name)}>\n{body}\n  </PolygonLabels>")
    parts.append("</View>")
    return "\n".join(parts) + "\n"


def image_url(path: str, root: str | os.PathLike | None = None, prefix: str | None = None) -> str:
    """The URL Label Studio loads an image from.

    http(s) URLs are returned unchanged. A local ``path`` is made relative to ``root`` (default:
    the current directory); the URL is then ``prefix`` + that relative path (URL-quoted) when a
    prefix is given, else Label Studio's local-files URL ``/data/local-files/?d=<relative path>``.
    An image outside ``root`` raises ImageURLError.
    """
    if path.startswith(("http://", "https://")):
        return path
    base = Path(root if root is not None else os.getcwd()).expanduser().resolve()
    full = Path(path).expanduser().resolve()
    try:
        rel = full.relative_to(base).as_posix()
    except ValueError:
        how = ("set --ls-root to a folder above it" if prefix
               else "set --ls-root (and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) to a folder above it")
        raise ImageURLError(f"image {path} is outside the Label Studio root {base}; {how}") from None
    if prefix:
        return prefix.rstrip("/") + "/" + urllib.parse.quote(rel, safe="/")
    return LOCAL_FILES_PREFIX + urllib.parse.quote(rel, safe="/")


def _pct(v: float, size: int) -> float:
    return round(100.0 * v / size, 6)


class LabelStudioWriter:
    """Accumulates Label Studio tasks with predictions; ``write`` dumps a valid file at any time.

    A task's prediction ``score`` is the *mean* of its regions' scores (0.0 for an image without
    detections), so Label Studio's "prediction score" column orders images by how confident the
    model was overall; each region keeps its own score.
    """

    def __init__(self, model_version: str, from_name: str = "label", to_name: str = "image",
                 url: Callable[[str], str] = image_url, polygon_name: str = "polygon") -> None:
        self.model_version = model_version
        self.from_name, self.to_name, self.polygon_name = from_name, to_name, polygon_name
        self.url = url
        self.tasks: list[dict[str, Any]] = []

    def add(self, image_path: str, width: int, height: int, instances: Instances, labels: LabelTable) -> dict:
        """One image and its detections, as every writer takes them: boxes clipped to the image,
        a score each (required: these are predictions), the label's name, and with polygons
        (COCO, pixels) a polygon region too (parts joined into one ring). Labels without a
        category are left out, as in the other formats. Returns the task."""
        if instances.scores is None:
            raise ValueError("Label Studio predictions need a score per instance")
        W, H = int(width), int(height)
        keep = [i for i, lab in enumerate(instances.labels) if labels.get(int(lab)) is not None]
        boxes = np.clip(np.asarray(instances.boxes, dtype=np.float64)[keep], 0.0, [W, H, W, H])
        scores = [float(instances.scores[i]) for i in keep]
        names = [labels.name(int(instances.labels[i])) for i in keep]
        polygons = [instances.polygons[i] for i in keep] if instances.polygons is not None else None
        n_task = len(self.tasks) + 1
        results: list[dict[str, Any]] = []
        for i, ((x1, y1, x2, y2), score, name) in enumerate(zip(boxes, scores, names)):
            common = {"original_width": W, "original_height": H, "image_rotation": 0}
            score = round(score, 6)
            results.append({
                "id": f"t{n_task}r{i + 1}", "from_name": self.from_name, "to_name": self.to_name,
                "type": "rectanglelabels", **common,
                "value": {
                    "x": _pct(x1, W), "y": _pct(y1, H), "width": _pct(max(0.0, x2 - x1), W),
                    "height": _pct(max(0.0, y2 - y1), H), "rotation": 0, "rectanglelabels": [str(name)],
                },
                "score": score,
            })
            ring = join_polygons(polygons[i]) if polygons is not None else []
            if ring:
                xy = np.clip(np.asarray(ring, np.float64).reshape(-1, 2), 0.0, [W, H])
                points = [[_pct(x, W), _pct(y, H)] for x, y in xy]
                results.append({
                    "id": f"t{n_task}p{i + 1}", "from_name": self.polygon_name, "to_name": self.to_name,
                    "type": "polygonlabels", **common,
                    "value": {"points": points, "closed": True, "polygonlabels": [str(name)]},
                    "score": score,
                })
        task = {
            "data": {"image": self.url(image_path), "ddetr_path": image_path},
            "predictions": [{
                "model_version": self.model_version,
                "score": round(float(np.mean(scores)), 6) if scores else 0.0,
                "result": results,
            }],
        }
        self.tasks.append(task)
        return task

    def write(self, path: str | os.PathLike) -> None:
        """The tasks so far as a JSON list, atomically (``files.atomic_write_text``)."""
        atomic_write_text(Path(path), json.dumps(self.tasks))

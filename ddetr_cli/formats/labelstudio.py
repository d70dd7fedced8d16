"""Label Studio pre-labels: tasks with predictions (``labelstudio.json``) and a labeling config.

Label Studio imports a JSON list of tasks; each task names its image by URL in ``data`` and may
carry ``predictions``: regions in *percent* of the image (``x``, ``y``, ``width``, ``height`` of a
rectangle; polygon ``points``), each with its ``score``. A region's ``from_name`` / ``to_name``
must be the ``name`` of a control tag (``RectangleLabels``) and of the ``Image`` tag in the
project's labeling config, and its label one of that tag's ``Label`` values: ``labeling_config``
writes the matching config; ``read_labeling_config`` reads a project's own (for ``ddetr serve``,
which answers Label Studio with ``prediction``).

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
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from ddetr_cli.files import atomic_write_text
from ddetr_cli.formats.annotations import Instances
from ddetr_cli.formats.labels import Category, LabelTable
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


class LabelingConfigError(ValueError):
    """A labeling config that names no target for detections; the message is one line."""


@dataclass(frozen=True)
class LabelControl:
    """A ``RectangleLabels`` / ``PolygonLabels`` tag: its ``name`` (a result's ``from_name``), the
    ``Image`` it labels (``to_name``) and its ``Label`` values, in order."""

    from_name: str
    to_name: str
    labels: tuple[str, ...]
    # lower-cased model class name -> Label value: the value itself, then the names a Label lists
    # in ``predicted_values="a,b"`` (Label Studio's ML backends' way of naming model classes)
    lookup: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def label_for(self, name: str) -> str | None:
        """The Label value a model class maps to: the value spelled the same, else the same but
        for case, else a Label listing it in ``predicted_values``; None when the config has none."""
        return name if name in self.labels else self.lookup.get(name.strip().lower())


@dataclass(frozen=True)
class LabelingTargets:
    """What a project's labeling config asks of a detector: the task ``data`` field holding the
    image URL (an ``Image`` tag's ``value="$field"``) and the controls regions are written to."""

    image_field: str
    rectangles: LabelControl | None
    polygons: LabelControl | None

    @property
    def to_name(self) -> str:
        """The ``Image`` tag's name, the ``to_name`` of every region."""
        return (self.rectangles or self.polygons).to_name  # type: ignore[union-attr]


def _control(tag: ET.Element, to_name: str) -> LabelControl:
    values = [lab.get("value") or "" for lab in tag.iter("Label") if lab.get("value")]
    lookup: dict[str, str] = {}
    for v in values:
        lookup.setdefault(v.strip().lower(), v)
    for lab in tag.iter("Label"):
        v = lab.get("value")
        for alias in (lab.get("predicted_values") or "").split(","):
            if v and alias.strip():
                lookup.setdefault(alias.strip().lower(), v)
    return LabelControl(tag.get("name") or "", to_name, tuple(values), lookup)


def read_labeling_config(xml: str) -> LabelingTargets:
    """A project's labeling config (XML) -> where detections go: the first ``RectangleLabels`` on
    an ``Image`` tag, and a ``PolygonLabels`` on the same image (either may be absent, not both).
    Raises LabelingConfigError for a config that is not XML or has neither."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise LabelingConfigError(f"the labeling config is not valid XML ({e})") from None
    images = {}
    for img in root.iter("Image"):
        value = img.get("value") or ""
        if img.get("name") and value.startswith("$"):
            images[img.get("name")] = value[1:]

    def first(kind: str, image: str | None) -> LabelControl | None:
        for tag in root.iter(kind):
            for to in (t.strip() for t in (tag.get("toName") or "").split(",")):
                if to in images and (image is None or to == image) and tag.get("name"):
                    return _control(tag, to)
        return None

    rect = first("RectangleLabels", None)
    poly = first("PolygonLabels", rect.to_name if rect else None)
    if rect is None and poly is None:
        raise LabelingConfigError("the labeling config has no RectangleLabels or PolygonLabels tag on an Image "
                                  "(<Image name=\"image\" value=\"$image\"/> <RectangleLabels name=\"label\" "
                                  "toName=\"image\">...)")
    image = (rect or poly).to_name
    return LabelingTargets(images[image], rect, poly)


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


def prediction(instances: Instances, labels: LabelTable, width: int, height: int, model_version: str, *,
               from_name: str | None = "label", to_name: str = "image", polygon_name: str | None = "polygon",
               polygon_labels: LabelTable | None = None, id_prefix: str = "") -> dict[str, Any]:
    """One image's detections as a Label Studio prediction: ``{"model_version", "score", "result"}``.

    ``instances``: boxes (N, 4) xyxy in pixels (clipped to the image), label indices, scores
    (required: these are predictions), optional polygons (COCO, pixels). Each instance whose label
    has a category in ``labels`` becomes a ``rectanglelabels`` region of the control ``from_name``
    (None: no rectangles) named by the category; with polygons and a ``polygon_name`` (None: no
    polygons) one whose label has a category in ``polygon_labels`` (default ``labels``) also
    becomes a ``polygonlabels`` region (parts joined into one ring). Regions are in percent of the
    image, each with its instance's score; labels without a category are left out, as in the other
    formats. The prediction's ``score`` is the *mean* score of the instances kept (0.0 for none),
    so Label Studio's "prediction score" column orders images by how confident the model was
    overall. Region ids are ``<id_prefix>r<k>`` / ``<id_prefix>p<k>``.
    """
    if instances.scores is None:
        raise ValueError("Label Studio predictions need a score per instance")
    W, H = int(width), int(height)
    plabels = polygon_labels if polygon_labels is not None else labels
    with_polygons = instances.polygons is not None and polygon_name is not None
    boxes = np.clip(np.asarray(instances.boxes, dtype=np.float64).reshape(-1, 4), 0.0, [W, H, W, H])
    results: list[dict[str, Any]] = []
    kept: list[float] = []
    for i, (lab, (x1, y1, x2, y2)) in enumerate(zip(instances.labels, boxes)):
        rect_cat = labels.get(int(lab)) if from_name is not None else None
        poly_cat = plabels.get(int(lab)) if with_polygons else None
        if rect_cat is None and poly_cat is None:
            continue
        score = round(float(instances.scores[i]), 6)
        kept.append(float(instances.scores[i]))
        k = len(kept)
        common = {"original_width": W, "original_height": H, "image_rotation": 0}
        if rect_cat is not None:
            results.append({
                "id": f"{id_prefix}r{k}", "from_name": from_name, "to_name": to_name,
                "type": "rectanglelabels", **common,
                "value": {
                    "x": _pct(x1, W), "y": _pct(y1, H), "width": _pct(max(0.0, x2 - x1), W),
                    "height": _pct(max(0.0, y2 - y1), H), "rotation": 0, "rectanglelabels": [rect_cat.name],
                },
                "score": score,
            })
        ring = join_polygons(instances.polygons[i]) if poly_cat is not None else []
        if ring:
            xy = np.clip(np.asarray(ring, np.float64).reshape(-1, 2), 0.0, [W, H])
            results.append({
                "id": f"{id_prefix}p{k}", "from_name": polygon_name, "to_name": to_name,
                "type": "polygonlabels", **common,
                "value": {"points": [[_pct(x, W), _pct(y, H)] for x, y in xy], "closed": True,
                          "polygonlabels": [poly_cat.name]},
                "score": score,
            })
    return {
        "model_version": model_version,
        "score": round(float(np.mean(kept)), 6) if kept else 0.0,
        "result": results,
    }


def config_label_table(labels: LabelTable, control: LabelControl) -> tuple[LabelTable, list[str]]:
    """A model's label table renamed to a labeling config's Labels (:meth:`LabelControl.label_for`)
    -> (the table of the classes the config has, the names of those it has not, in label order).
    Label indices and category ids are the model's."""
    cats, missing = [], []
    for c in labels:
        name = control.label_for(c.name)
        if name is None:
            missing.append(c.name)
        else:
            cats.append(Category(label=c.label, id=c.id, name=name, yolo=len(cats), supercategory=c.supercategory))
    return LabelTable(cats, labels.num_labels), missing


class LabelStudioWriter:
    """Accumulates Label Studio tasks with predictions (see :func:`prediction`); ``write`` dumps a
    valid file at any time."""

    def __init__(self, model_version: str, from_name: str = "label", to_name: str = "image",
                 url: Callable[[str], str] = image_url, polygon_name: str = "polygon") -> None:
        self.model_version = model_version
        self.from_name, self.to_name, self.polygon_name = from_name, to_name, polygon_name
        self.url = url
        self.tasks: list[dict[str, Any]] = []

    def add(self, image_path: str, width: int, height: int, instances: Instances, labels: LabelTable) -> dict:
        """One image and its detections, as every writer takes them (boxes in pixels, label
        indices into ``labels``, scores, optional polygons). Returns the task."""
        pred = prediction(instances, labels, width, height, self.model_version, from_name=self.from_name,
                          to_name=self.to_name, polygon_name=self.polygon_name, id_prefix=f"t{len(self.tasks) + 1}")
        task = {"data": {"image": self.url(image_path), "ddetr_path": image_path}, "predictions": [pred]}
        self.tasks.append(task)
        return task

    def write(self, path: str | os.PathLike) -> None:
        """The tasks so far as a JSON list, atomically (``files.atomic_write_text``)."""
        atomic_write_text(Path(path), json.dumps(self.tasks))

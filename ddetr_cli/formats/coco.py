"""COCO: reading a split's annotation JSON, writing a COCO dataset file.

Layouts read: roboflow style ``<split>/_annotations.coco.json`` with the images beside it
(``train/``, ``valid/`` or ``val/``, ``test/``); classic style
``annotations/instances_<split>[2017].json`` with images in ``<split>[2017]/``,
``images/<split>[2017]/`` or ``images/``. Boxes are ``bbox`` xywh pixels; ``segmentation``
polygons and RLE are kept as written; crowd annotations are ignored; categories with
``isthing: 0`` (COCO panoptic's stuff, as its converters write it) are stuff.

The file written (``CocoWriter``) is a *dataset* (images, categories, annotations, with
``score`` for predictions) because that is what CVAT and Label Studio import; category ids come
from the ``LabelTable`` (never 0, which CVAT drops). Instance masks go out as polygons: Label
Studio rejects RLE.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ddetr_cli.files import atomic_write_text
from ddetr_cli.formats.annotations import DatasetError, Entry, Instances, Source, canonical_split, positive_int
from ddetr_cli.formats.labels import LabelTable

ROBOFLOW_JSON = "_annotations.coco.json"


# --------------------------------------------------------------------------- reading


def coco_splits(root: Path) -> dict[str, Path]:
    """split -> annotation JSON, for the roboflow and the classic layout."""
    splits: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / ROBOFLOW_JSON).is_file():
            splits.setdefault(canonical_split(d.name), d / ROBOFLOW_JSON)
    ann = root / "annotations"
    if ann.is_dir():
        for f in sorted(ann.glob("instances_*.json")):
            name = f.stem[len("instances_"):].rstrip("0123456789") or f.stem
            splits.setdefault(canonical_split(name), f)
    return splits


def _image_dir(root: Path, ann_file: Path) -> Path:
    """Folder that file_name is relative to."""
    if ann_file.name == ROBOFLOW_JSON:
        return ann_file.parent
    stem = ann_file.stem[len("instances_"):]  # e.g. val2017
    bare = stem.rstrip("0123456789")
    for cand in (root / stem, root / "images" / stem, root / bare, root / "images" / bare,
                 root / "images"):
        if cand.is_dir():
            return cand
    return root


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None


def coco_segmentation(seg: Any) -> Any:
    """A COCO ``segmentation`` as written when it is well formed (polygons with >= 3 points, or
    an RLE dict with ``counts`` and ``size``); ``[]`` otherwise (the box is still used)."""
    if isinstance(seg, dict):
        size = seg.get("size")
        ok = isinstance(seg.get("counts"), (str, list)) and isinstance(size, list) and len(size) == 2
        return seg if ok else []
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                 and all(isinstance(v, (int, float)) for v in p)]
        return polys
    return []


def read_coco(root: Path, ann_file: Path) -> Source:
    """One split: the annotation JSON ``ann_file`` of the dataset at ``root``."""
    data = _read_json(ann_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{ann_file}: not a COCO annotation file (no 'images' list)")
    anns = data.get("annotations") or []
    cats = [c for c in data.get("categories") or [] if isinstance(c, dict)]
    try:
        cats = sorted(cats, key=lambda c: int(c["id"]))
        for c in cats:
            c["name"] = str(c["name"])
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{ann_file}: every category needs an integer 'id' and a 'name'") from None
    if not cats and anns:
        raise DatasetError(f"{ann_file}: has annotations but no 'categories'")
    used = {a.get("category_id") for a in anns if isinstance(a, dict)}
    notes = []
    # Roboflow exports add an unused parent category (often id 0) named as the others' supercategory.
    parents = {c.get("supercategory") for c in cats if c.get("supercategory") != c["name"]}
    dropped = [c for c in cats if c["name"] in parents and int(c["id"]) not in used]
    if dropped and len(dropped) < len(cats):
        cats = [c for c in cats if c not in dropped]
        notes.append("ignored unused parent categor" + ("y " if len(dropped) == 1 else "ies ")
                     + ", ".join(repr(c["name"]) for c in dropped))
    key_to_label = {int(c["id"]): i for i, c in enumerate(cats)}
    image_dir = _image_dir(root, ann_file)
    entries: dict[int, Entry] = {}
    for img in data["images"]:
        try:
            image_id, file_name = int(img["id"]), str(img["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{ann_file}: every image needs an 'id' and a 'file_name'") from None
        if image_id in entries:
            raise DatasetError(f"{ann_file}: image id {image_id} is used twice")
        entries[image_id] = Entry(path=image_dir / file_name, image_id=image_id,
                                  width=positive_int(img.get("width")),
                                  height=positive_int(img.get("height")))
    orphans = crowd = 0
    for a in anns:
        e = entries.get(a.get("image_id")) if isinstance(a, dict) else None
        if e is None:
            orphans += 1
            continue
        if a.get("iscrowd"):
            crowd += 1
            continue
        bbox = a.get("bbox")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            e.invalid += 1
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise DatasetError(f"{ann_file}: annotation {a.get('id')} (image {a.get('image_id')}) has a "
                               f"non-finite bbox {bbox}")
        e.boxes.append([x, y, x + w, y + h])
        e.keys.append(a.get("category_id"))
        e.segments.append(coco_segmentation(a.get("segmentation")))
    if orphans:
        notes.append(f"ignored {orphans} annotations whose image_id is not in 'images'")
    if crowd:
        notes.append(f"ignored {crowd} crowd (iscrowd=1) annotations")
    return Source(class_names=[c["name"] for c in cats], category_ids=[int(c["id"]) for c in cats],
                  key_to_label=key_to_label, entries=list(entries.values()), notes=notes,
                  stuff_ids=[int(c["id"]) for c in cats if c.get("isthing", 1) in (0, False)])


# --------------------------------------------------------------------------- writing


class CocoWriter:
    """Accumulates images and their instances; ``write`` dumps a valid COCO dataset at any time."""

    def __init__(self, labels: LabelTable) -> None:
        self.labels = labels
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, file_name: str, width: int, height: int, instances: Instances, source: str | None = None) -> int:
        """One image and its instances; returns its image id.

        ``source``: where the image came from (absolute path or URL), kept in the image record
        as ``ddetr_source`` (an extra key: pycocotools, Datumaro/CVAT and Label Studio ignore it).

        Float boxes are written rounded to 2 decimals (``area`` from the rounded box, so the file
        is self-consistent), integer boxes as integers. An instance's polygons are written as
        ``segmentation`` (``[]`` without), its ``areas`` entry, when given, as ``area``; scores,
        when given, as ``score`` (5 decimals).
        """
        image_id = len(self.images) + 1
        record = {"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)}
        if source is not None:
            record["ddetr_source"] = source
        self.images.append(record)
        exact = instances.boxes.dtype.kind in "iu"
        for i, (xyxy, label) in enumerate(zip(instances.boxes, instances.labels)):
            cat = self.labels.category_id(int(label))
            if cat is None:
                continue
            if exact:
                x1, y1, x2, y2 = (int(v) for v in xyxy)
                w, h = x2 - x1, y2 - y1
                area = w * h
            else:
                x1, y1, x2, y2 = (float(v) for v in xyxy)
                x1, y1 = round(x1, 2), round(y1, 2)
                w, h = round(max(0.0, x2 - x1), 2), round(max(0.0, y2 - y1), 2)
                area = round(w * h, 2)
            if instances.areas is not None and instances.areas[i] is not None:
                area = instances.areas[i]
            ann = {
                "id": len(self.annotations) + 1,
                "image_id": image_id,
                "category_id": cat,
                "bbox": [x1, y1, w, h],
                "area": area,
                "iscrowd": 0,
                "segmentation": list(instances.polygons[i]) if instances.polygons is not None else [],
            }
            if instances.scores is not None:
                ann["score"] = round(float(instances.scores[i]), 5)
            self.annotations.append(ann)
        return image_id

    def to_dict(self, info: dict[str, Any] | None = None) -> dict:
        return {
            "info": info or {},
            "licenses": [],
            "images": self.images,
            "categories": self.labels.coco_categories(),
            "annotations": self.annotations,
        }

    def dumps(self, info: dict[str, Any] | None = None, readable: bool = False) -> str:
        """The file's text: compact JSON, or with ``readable`` one image / annotation / category
        per line, categories first (diff-friendly without spending a line on every polygon
        coordinate: the committed examples)."""
        data = self.to_dict(info)
        if not readable:
            return json.dumps(data)
        data = {k: data[k] for k in ("info", "licenses", "categories", "images", "annotations")}
        parts = []
        for key, value in data.items():
            if isinstance(value, list) and value:
                rows = ",\n".join("  " + json.dumps(v) for v in value)
                parts.append(f" {json.dumps(key)}: [\n{rows}\n ]")
            else:
                parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
        return "{\n" + ",\n".join(parts) + "\n}\n"

    def write(self, path: Path, info: dict[str, Any] | None = None, readable: bool = False) -> None:
        """``dumps`` into ``path``, atomically."""
        atomic_write_text(path, self.dumps(info, readable))

"""Writing detections: COCO JSON for labeling tools, YOLO txt, Pascal VOC xml, annotated images.

The COCO file is a *dataset* (images, categories, annotations with score) because that is what
CVAT and Label Studio import; category ids come from the model's ``labels.LabelTable`` (never 0,
which CVAT drops). Instance masks
go out as polygons (``masks.mask_to_polygons``): Label Studio rejects RLE.
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import supervision as sv

from ddetr_cli.files import atomic_path, atomic_write_text
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.masks import join_polygons, mask_area


class CocoWriter:
    """Accumulates images and detections; ``write`` dumps a valid COCO dataset at any time."""

    def __init__(self, labels: LabelTable) -> None:
        self.labels = labels
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, file_name: str, width: int, height: int, dets: sv.Detections,
            polygons: Sequence[list[list[float]]] | None = None, source: str | None = None) -> int:
        """One image and its detections; returns its image id.

        ``source``: where the image came from (absolute path or URL), kept in the image record
        as ``ddetr_source`` (an extra key: pycocotools, Datumaro/CVAT and Label Studio ignore it).

        ``polygons``: per detection, its mask as COCO polygons (``masks.instance_polygons``), written
        as ``segmentation`` with ``area`` = the mask's pixel count; an empty mask keeps
        ``segmentation: []`` and the box area. The bbox is the detector's box either way.
        """
        image_id = len(self.images) + 1
        record = {"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)}
        if source is not None:
            record["ddetr_source"] = source
        self.images.append(record)
        for i, (xyxy, score, label) in enumerate(zip(dets.xyxy, dets.confidence, dets.class_id)):
            cat = self.labels.category_id(int(label))
            if cat is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in xyxy)
            # area from the rounded box, so the file is self-consistent
            x1, y1 = round(x1, 2), round(y1, 2)
            w, h = round(max(0.0, x2 - x1), 2), round(max(0.0, y2 - y1), 2)
            segmentation = list(polygons[i]) if polygons is not None else []
            area = round(w * h, 2)
            if segmentation and dets.mask is not None:
                area = float(mask_area(dets.mask[i]))
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x1, y1, w, h],
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": segmentation,
                    "score": round(float(score), 5),
                }
            )
        return image_id

    def to_dict(self, info: dict[str, Any] | None = None) -> dict:
        return {
            "info": info or {},
            "licenses": [],
            "images": self.images,
            "categories": self.labels.coco_categories(),
            "annotations": self.annotations,
        }

    def write(self, path: Path, info: dict[str, Any] | None = None) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(info)))


def yolo_lines(dets: sv.Detections, width: int, height: int, labels: LabelTable,
               polygons: Sequence[list[list[float]]] | None = None, save_conf: bool = False) -> str:
    """YOLO txt: ``class cx cy w h`` normalised, class = the category's contiguous YOLO index
    (``Category.yolo``); detections in unnamed slots are left out.

    With ``polygons`` (per detection, as for ``CocoWriter.add``): YOLO segmentation lines
    ``class x1 y1 x2 y2 ...`` normalised, one ring per instance (parts joined by zero-width cuts,
    since the format has one polygon per line); an empty mask is written as its box's corners,
    so every line of the file is a polygon.

    ``save_conf``: the confidence as a last column (ultralytics' ``save_conf``), with the 5
    decimals of ``score`` in predictions.json.
    """
    rows = []
    for i, ((x1, y1, x2, y2), label, score) in enumerate(zip(dets.xyxy, dets.class_id, dets.confidence)):
        cat = labels.get(int(label))
        if cat is None:
            continue
        conf = f" {float(score):.5f}" if save_conf else ""
        if polygons is not None:
            ring = join_polygons(polygons[i]) or [x1, y1, x2, y1, x2, y2, x1, y2]
            xy = " ".join(f"{v / (width if k % 2 == 0 else height):.6f}" for k, v in enumerate(ring))
            rows.append(f"{cat.yolo} {xy}{conf}")
            continue
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        w, h = (x2 - x1) / width, (y2 - y1) / height
        rows.append(f"{cat.yolo} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}{conf}")
    return "\n".join(rows) + ("\n" if rows else "")


def voc_xml(file_name: str, width: int, height: int, dets: sv.Detections, labels: LabelTable) -> str:
    """Pascal VOC annotation, ``<name>`` = the category name; pixel coordinates are 1-based
    inclusive as in the devkit. Detections in unnamed slots are left out."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for (x1, y1, x2, y2), label, score in zip(dets.xyxy, dets.class_id, dets.confidence):
        cat = labels.get(int(label))
        if cat is None:
            continue
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = cat.name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        ET.SubElement(obj, "confidence").text = f"{float(score):.5f}"
        bb = ET.SubElement(obj, "bndbox")
        ET.SubElement(bb, "xmin").text = str(int(round(x1)) + 1)
        ET.SubElement(bb, "ymin").text = str(int(round(y1)) + 1)
        ET.SubElement(bb, "xmax").text = str(max(int(round(x2)), int(round(x1)) + 1))
        ET.SubElement(bb, "ymax").text = str(max(int(round(y2)), int(round(y1)) + 1))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def yolo_data_yaml(root: Path, labels: LabelTable) -> str:
    """The dataset YAML of ultralytics (and supervision's ``from_yolo``, Datumaro's
    ``yolo_ultralytics``): ``path`` = the run folder (absolute, so any working directory
    works; delete it after moving the folder and ultralytics uses the YAML's own folder),
    ``train``/``val`` = its ``images/``, whose label files are ``labels/<stem>.txt``;
    ``names`` in YOLO index order."""
    import yaml

    doc = {"path": str(Path(root).absolute()), "train": "images", "val": "images",
           "nc": len(labels), "names": {c.yolo: c.name for c in labels}}
    return "# ddetr detect pre-labels: ultralytics / supervision / Datumaro YOLO layout\n" + yaml.safe_dump(
        doc, sort_keys=False, allow_unicode=True)


def yolo_classes_txt(labels: LabelTable) -> str:
    """``classes.txt`` (and darknet ``obj.names``): one name per line, YOLO index order."""
    return "".join(f"{n}\n" for n in labels.names)


def voc_labelmap(labels: LabelTable) -> str:
    """``labelmap.txt`` of a Pascal VOC folder as Datumaro (and so CVAT) reads it: the header
    ``# label:color_rgb:parts:actions`` and one ``name:::`` line per category, in label order
    (without it the 20 VOC classes are assumed and other names are rejected)."""
    for n in labels.names:
        if ":" in n:
            raise ValueError(f"class name {n!r} has a ':', which labelmap.txt cannot hold")
    return "# label:color_rgb:parts:actions\n" + "".join(f"{n}:::\n" for n in labels.names)


def link_image(dst: Path, source: str | None, image_rgb: np.ndarray) -> None:
    """Put the image at ``dst``: a hard link to the local file ``source`` (no copy; a symbolic
    link would not do: Datumaro refuses image paths that resolve outside the dataset), its
    bytes where a hard link is not possible (another file system), the decoded image for URLs.
    Atomic: an existing ``dst`` is replaced."""
    if source is not None and Path(source).is_file():
        with atomic_path(dst) as tmp:
            tmp.unlink()
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
        return
    write_image(dst, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))


class Annotator:
    """Boxes with class names and scores (and track ids when present) drawn with supervision;
    instance masks, when the detections carry them, filled translucent under the boxes."""

    def __init__(self, labels: LabelTable) -> None:
        self.table = labels
        self.mask = sv.MaskAnnotator(opacity=0.45)
        self.box = sv.BoxAnnotator(thickness=2)
        self.label = sv.LabelAnnotator(text_scale=0.5, text_padding=3)

    def labels(self, dets: sv.Detections) -> list[str]:
        out = []
        for i, (label, score) in enumerate(zip(dets.class_id, dets.confidence)):
            name = self.table.name(int(label))
            tid = f"#{int(dets.tracker_id[i])} " if dets.tracker_id is not None else ""
            out.append(f"{tid}{name} {float(score):.2f}")
        return out

    def draw(self, image_bgr: np.ndarray, dets: sv.Detections, labels: Sequence[str] | None = None) -> np.ndarray:
        """(H, W, 3) uint8 BGR -> annotated copy; ``labels`` replaces the default texts.

        dets.mask, when set, is (N, H, W) bool in this image's pixels.
        """
        frame = image_bgr.copy()
        if len(dets) == 0:
            return frame
        if dets.mask is not None:
            frame = self.mask.annotate(frame, dets)
        frame = self.box.annotate(frame, dets)
        return self.label.annotate(frame, dets, labels=list(labels) if labels is not None else self.labels(dets))


def write_image(path: Path, image_bgr: np.ndarray) -> None:
    """Encode by ``path``'s suffix (JPEG, PNG, ...) and write atomically."""
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image_bgr):
            raise OSError(f"cannot write {path}")



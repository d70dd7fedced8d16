"""Writing detections: COCO JSON for labeling tools, YOLO txt, Pascal VOC xml, annotated images.

The COCO file is a *dataset* (images, categories, annotations with score) because that is what
CVAT and Label Studio import; category ids come from the model's ``labels.LabelTable`` (never 0,
which CVAT drops). Instance masks
go out as polygons (``masks.mask_to_polygons``): Label Studio rejects RLE.
"""

from __future__ import annotations

import json
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
            polygons: Sequence[list[list[float]]] | None = None) -> int:
        """One image and its detections; returns its image id.

        ``polygons``: per detection, its mask as COCO polygons (``masks.instance_polygons``), written
        as ``segmentation`` with ``area`` = the mask's pixel count; an empty mask keeps
        ``segmentation: []`` and the box area. The bbox is the detector's box either way.
        """
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)})
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
               polygons: Sequence[list[list[float]]] | None = None) -> str:
    """YOLO txt: ``class cx cy w h`` normalised, class = the category's contiguous YOLO index
    (``Category.yolo``); detections in unnamed slots are left out.

    With ``polygons`` (per detection, as for ``CocoWriter.add``): YOLO segmentation lines
    ``class x1 y1 x2 y2 ...`` normalised, one ring per instance (parts joined by zero-width cuts,
    since the format has one polygon per line); an empty mask is written as its box's corners,
    so every line of the file is a polygon.
    """
    rows = []
    for i, ((x1, y1, x2, y2), label) in enumerate(zip(dets.xyxy, dets.class_id)):
        cat = labels.get(int(label))
        if cat is None:
            continue
        if polygons is not None:
            ring = join_polygons(polygons[i]) or [x1, y1, x2, y1, x2, y2, x1, y2]
            xy = " ".join(f"{v / (width if k % 2 == 0 else height):.6f}" for k, v in enumerate(ring))
            rows.append(f"{cat.yolo} {xy}")
            continue
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        w, h = (x2 - x1) / width, (y2 - y1) / height
        rows.append(f"{cat.yolo} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "\n".join(rows) + ("\n" if rows else "")


def voc_xml(file_name: str, width: int, height: int, dets: sv.Detections, labels: LabelTable) -> str:
    """Pascal VOC annotation, ``<name>`` = the category name; pixel coordinates are 1-based
    inclusive as in the devkit. Detections in unnamed slots are left out."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "images"
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



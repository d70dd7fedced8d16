"""Read a detection dataset in COCO, YOLO or Pascal VOC layout into one in-memory form.

The formats are parsed by ``formats.coco``, ``formats.yolo`` and ``formats.voc`` (layouts they
understand: their docstrings) into a neutral ``formats.annotations.Source``; this module finds
the format and the split, carves a validation split when there is none, and builds the records.

Every box comes out as absolute ``xyxy`` pixels (pixel-edge convention, ``0 <= x1 < x2 <= W``)
with a contiguous 0-based label. Instance masks are kept as COCO segmentations beside the boxes
(``Record.segments``): COCO polygons and RLE as written, YOLO segmentation lines as absolute
polygons. Problems that can be repaired are repaired and counted in a ``Report``; fatal ones raise
``DatasetError`` with one line naming the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ddetr_cli.formats.annotations import DatasetError, Entry, canonical_split
from ddetr_cli.formats.coco import ROBOFLOW_JSON, coco_splits, read_coco
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.voc import is_voc, read_voc, voc_splits
from ddetr_cli.formats.yolo import read_yolo, yolo_splits, yolo_yaml

FORMATS = ("coco", "yolo", "voc")
_FORMAT_ALIASES = {"coco": "coco", "yolo": "yolo", "voc": "voc", "pascal_voc": "voc",
                   "pascal-voc": "voc", "pascalvoc": "voc"}
# format -> (split -> locator, read one split's locator)
_READERS = {"coco": (coco_splits, read_coco), "yolo": (yolo_splits, read_yolo), "voc": (voc_splits, read_voc)}
_SHOW = 5  # how many file names a message lists


# --------------------------------------------------------------------------- data types


@dataclass
class Report:
    """What loading repaired or skipped. Counts are for the loaded split only."""

    images: int = 0
    boxes: int = 0
    clipped: int = 0
    dropped_degenerate: int = 0
    dropped_unknown: int = 0
    unknown_categories: Counter = field(default_factory=Counter)
    dropped_invalid: int = 0
    missing_images: int = 0
    missing_names: list[str] = field(default_factory=list)
    sizes_read: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """Human-readable lines: totals first, then one line per kind of problem."""
        lines = [f"{self.images} images, {self.boxes} boxes"]
        if self.clipped:
            lines.append(f"clipped {self.clipped} boxes that extended past the image border")
        if self.dropped_degenerate:
            lines.append(f"dropped {self.dropped_degenerate} boxes with zero or negative size")
        if self.dropped_unknown:
            cats = ", ".join(f"{k} ({n})" for k, n in sorted(self.unknown_categories.items()))
            lines.append(f"dropped {self.dropped_unknown} boxes with unknown categories: {cats}")
        if self.dropped_invalid:
            lines.append(f"dropped {self.dropped_invalid} malformed annotations")
        if self.missing_images:
            more = " ..." if self.missing_images > len(self.missing_names) else ""
            lines.append(f"skipped {self.missing_images} images whose files are missing or "
                         f"unreadable: {', '.join(self.missing_names)}{more}")
        if self.sizes_read:
            lines.append(f"read width/height from {self.sizes_read} image files")
        return lines + list(self.notes)

    def _missing(self, name: str) -> None:
        self.missing_images += 1
        if len(self.missing_names) < _SHOW:
            self.missing_names.append(name)


@dataclass
class Record:
    """One image and its boxes.

    boxes: (K, 4) float32 absolute xyxy pixels; labels: (K,) int64 indices into class_names;
    segments: K COCO segmentations in absolute pixels (a list of polygons or an RLE dict), ``[]``
    for a box without a mask (empty list = no masks at all).
    """

    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    segments: list[Any] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return any(bool(s) for s in self.segments)

    def masks(self) -> np.ndarray:
        """(K, height, width) bool instance masks decoded with pycocotools (False where none)."""
        from ddetr_cli.formats.masks import segmentation_to_mask

        out = np.zeros((len(self.boxes), self.height, self.width), bool)
        for k, seg in enumerate(self.segments[: len(out)]):
            if seg:
                out[k] = segmentation_to_mask(seg, self.height, self.width)
        return out

    def read(self) -> np.ndarray:
        """Decode the image: (H, W, 3) uint8 RGB, EXIF orientation applied."""
        bgr = cv2.imread(str(self.path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"cannot read image {self.path}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass
class Dataset:
    """One split of a dataset. category_ids are the dataset's own ids, aligned with class_names."""

    root: Path
    format: str
    split: str
    class_names: list[str]
    category_ids: list[int]
    records: list[Record]
    report: Report
    stuff_ids: list[int] = field(default_factory=list)  # category ids that are stuff (COCO isthing 0)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> LabelTable:
        """Label -> category id and name as files write them, and the table a model trained on
        this data carries: COCO datasets keep their own ids (so pre-labels merge back into the
        user's project and predictions score against the original file); YOLO/VOC are numbered
        from 1, since COCO tools read id 0 as "no label"."""
        own = self.format == "coco" and len(self.category_ids) == len(self.class_names)
        ids = [int(c) for c in self.category_ids] if own else list(range(1, len(self.class_names) + 1))
        return LabelTable.from_names(self.class_names, ids, stuff_ids=self.stuff_ids if own else None)

    def to_coco_dict(self, records: Sequence[Record] | None = None) -> dict:
        """COCO ground truth for pycocotools (bbox xywh, area w*h) of ``records`` (default all),
        with the category ids of ``labels``."""
        cat_ids = [c.id for c in self.labels]
        images, annotations = [], []
        for r in self.records if records is None else records:
            images.append({"id": int(r.image_id), "file_name": r.path.name,
                           "width": r.width, "height": r.height})
            for k, ((x1, y1, x2, y2), label) in enumerate(zip(r.boxes.tolist(), r.labels.tolist())):
                w, h = x2 - x1, y2 - y1
                seg = r.segments[k] if k < len(r.segments) else []
                annotations.append({"id": len(annotations) + 1, "image_id": int(r.image_id),
                                    "category_id": cat_ids[label], "bbox": [x1, y1, w, h],
                                    "area": w * h, "iscrowd": 0, "segmentation": seg or []})
        categories = [{"id": c.id, "name": c.name, "supercategory": "none"} for c in self.labels]
        return {"info": {"description": f"{self.root} ({self.format}, {self.split})"},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": categories}


# --------------------------------------------------------------------------- helpers


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF rotation, reading only the header if PIL can."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
                w, h = h, w
            return w, h
    except Exception:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise OSError(f"cannot read {path}") from None
        return img.shape[1], img.shape[0]


def _build(entries: list[Entry], key_to_label: dict[Any, int], report: Report) -> list[Record]:
    """Check files, fill missing sizes, map categories, clip/drop boxes; update `report`."""
    records = []
    for e in entries:
        if not e.path.is_file():
            report._missing(e.path.name)
            continue
        width, height = e.width, e.height
        if not width or not height:
            try:
                width, height = _image_size(e.path)
            except OSError:
                report._missing(e.path.name + " (unreadable)")
                continue
            report.sizes_read += not e.normalized  # YOLO never lists sizes: not worth a line
        report.dropped_invalid += e.invalid
        boxes, labels, segments = [], [], []
        for k, (box, key) in enumerate(zip(e.boxes, e.keys)):
            if key not in key_to_label:
                report.dropped_unknown += 1
                report.unknown_categories[str(key)] += 1
                continue
            x1, y1, x2, y2 = box
            if e.normalized:
                x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
            cx1, cx2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
            cy1, cy2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
            if cx2 <= cx1 or cy2 <= cy1:
                report.dropped_degenerate += 1
                continue
            if max(abs(cx1 - x1), abs(cx2 - x2), abs(cy1 - y1), abs(cy2 - y2)) > 1e-3:
                report.clipped += 1
            boxes.append((cx1, cy1, cx2, cy2))
            labels.append(key_to_label[key])
            seg = e.segments[k] if k < len(e.segments) else []
            if seg and e.normalized:  # YOLO polygons: fractions of the image size
                seg = [[v * (width if j % 2 == 0 else height) for j, v in enumerate(p)] for p in seg]
            segments.append(seg)
        records.append(Record(path=e.path, width=int(width), height=int(height),
                              boxes=np.array(boxes, np.float32).reshape(-1, 4),
                              labels=np.array(labels, np.int64), image_id=e.image_id,
                              segments=segments))
        report.boxes += len(boxes)
    report.images = len(records)
    return records


# --------------------------------------------------------------------------- public API


def detect_format(root: Path) -> str:
    """Return "coco", "yolo" or "voc" for a dataset folder; raise DatasetError otherwise."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; give the dataset's root folder")
    if coco_splits(root):
        return "coco"
    if yolo_yaml(root):
        return "yolo"
    if is_voc(root):
        return "voc"
    if (root / ROBOFLOW_JSON).is_file():
        raise DatasetError(f"{root} holds one COCO split; give its parent folder (the dataset root)")
    raise DatasetError(
        f"{root}: unknown dataset format; expected COCO (train/{ROBOFLOW_JSON} or "
        "annotations/instances_train.json), YOLO (data.yaml with images/ and labels/) "
        "or Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/)")


def _carve(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Bool mask (n,) of the entries that go to the carved validation split."""
    n_val = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 else 0
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return mask


def load_dataset(root: Path, split: str = "train", format: str | None = None, *,
                 val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load one split of a COCO, YOLO or Pascal VOC dataset (format auto-detected if None).

    `split` accepts train / val (also valid, validation) / test or any split the dataset names.
    Without a validation split, `val_fraction` of train (chosen with `seed`) becomes val and is
    left out of train; the report's notes say so. Images are not decoded except to read a size
    the annotations do not give.
    """
    root = Path(root)
    if format is None:
        fmt = detect_format(root)
    else:
        fmt = _FORMAT_ALIASES.get(format.lower())
        if fmt is None:
            raise DatasetError(f"unknown dataset format {format!r}; expected coco, yolo or voc")
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist")
    find_splits, read = _READERS[fmt]
    splits = find_splits(root)
    want = canonical_split(split)
    report = Report()
    carve = None
    if want in splits:
        locator = splits[want]
        if want == "train" and "val" not in splits and val_fraction > 0:
            carve = "train"
    elif want == "val" and "train" in splits and val_fraction > 0:
        locator, carve = splits["train"], "val"
    else:
        have = ", ".join(splits) or "none"
        raise DatasetError(f"{root}: no split {split!r} in this {fmt} dataset (splits found: {have})")
    source = read(root, locator)
    entries = source.entries
    if carve:
        to_val = _carve(len(entries), val_fraction, seed)
        entries = [e for e, v in zip(entries, to_val) if v == (carve == "val")]
        report.notes.append(
            f"no validation split: {int(to_val.sum())} of {len(to_val)} train images "
            f"(fraction {val_fraction:g}, seed {seed}) are used as val and left out of train")
    if not entries:
        raise DatasetError(f"{root}: split {split!r} is empty (no images listed)")
    report.notes.extend(source.notes)
    records = _build(entries, source.key_to_label, report)
    if not records:
        raise DatasetError(f"{root}: none of the {len(entries)} images of split {split!r} "
                           f"could be read (first: {', '.join(report.missing_names)})")
    return Dataset(root=root, format=fmt, split=want, class_names=source.class_names,
                   category_ids=source.category_ids, records=records, report=report, stuff_ids=source.stuff_ids)

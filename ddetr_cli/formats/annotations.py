"""What every dataset format shares: the neutral form a reader parses annotations into
(``Entry``, ``Source``) and a writer writes from (``Instances``), and the one error readers raise.

Readers (``coco.read_coco``, ``yolo.read_yolo``, ``voc.read_voc``) turn one split of a dataset
into a ``Source``: its classes, a mapping from the format's category key to a label, and one
``Entry`` per listed image with its boxes as written. Checking files, clipping and counting is
format-neutral and lives with the dataset (``data.datasets``).

Writers take ``Instances``: plain arrays (boxes xyxy in pixels, label indices into a
``LabelTable``, optional scores, polygons and areas), built from ground truth or from
``supervision.Detections`` (``Instances.from_detections``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.masks import mask_area

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}


class DatasetError(ValueError):
    """A dataset that cannot be used; the message is one line naming the file at fault."""


def canonical_split(name: str) -> str:
    """'valid'/'validation' -> 'val', 'training' -> 'train', ...; other names unchanged."""
    return _SPLIT_ALIASES.get(name.lower(), name)


def positive_int(value: Any) -> int | None:
    """``value`` as a positive int (``"640"``, ``640.0``); None for anything else."""
    try:
        v = int(float(value))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and p.is_file())


def names_txt(labels: LabelTable) -> str:
    """One category name per line, in label order: YOLO's ``classes.txt`` (darknet
    ``obj.names``) and Pascal VOC's ``labels.txt``."""
    return "".join(f"{n}\n" for n in labels.names)


# --------------------------------------------------------------------------- reading


@dataclass
class Entry:
    """An image as listed by the annotations, before files are checked.

    boxes: (K, 4) xyxy, absolute pixels or (when `normalized`) fractions of the image size.
    keys: (K,) category keys (COCO/YOLO id or VOC name).
    segments: (K,) COCO segmentations ([] = none), scaled like the boxes.
    invalid: annotations that could not be parsed (counted, not kept).
    """

    path: Path
    image_id: int
    width: int | None
    height: int | None
    boxes: list[list[float]] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    segments: list[Any] = field(default_factory=list)
    normalized: bool = False
    invalid: int = 0


@dataclass
class Source:
    """A parsed split: class list, mapping from category key to label, listed images, and notes
    on what the reader ignored."""

    class_names: list[str]
    category_ids: list[int]
    key_to_label: dict[Any, int]
    entries: list[Entry]
    notes: list[str] = field(default_factory=list)
    stuff_ids: list[int] = field(default_factory=list)  # category ids marked ``isthing: 0`` (COCO)


# --------------------------------------------------------------------------- writing


@dataclass
class Instances:
    """The objects of one image, as every writer takes them.

    boxes: (N, 4) xyxy pixels; integer boxes (ground truth on the pixel grid) are written as
    integers where the format has a choice (COCO). labels: (N,) indices into the writer's
    ``LabelTable``; labels without a category (unnamed slots) are left out of every file.
    scores: (N,) confidences, or None for ground truth (no ``score`` / ``confidence`` written).
    polygons: per instance its COCO polygons (pixels; ``[]`` = no mask), or None without masks.
    areas: per instance the COCO ``area`` to write (a mask's pixel count) or None for the box's.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None
    polygons: Sequence[list[list[float]]] | None = None
    areas: Sequence[float | int | None] | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes).reshape(-1, 4)
        self.labels = np.asarray(self.labels).reshape(-1)
        n = len(self.boxes)
        if len(self.labels) != n or any(x is not None and len(x) != n for x in (self.scores, self.polygons, self.areas)):
            raise ValueError("boxes, labels (and scores, polygons, areas) must have one entry per instance")

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def from_detections(cls, dets: Any, polygons: Sequence[list[list[float]]] | None = None) -> Instances:
        """A ``supervision.Detections`` (xyxy, class_id, confidence, optional mask) and, with
        masks, its polygons (``masks.instance_polygons``): the area of an instance with a
        polygon is its mask's pixel count."""
        areas = None
        if polygons is not None and dets.mask is not None:
            areas = [float(mask_area(m)) if p else None for m, p in zip(dets.mask, polygons)]
        return cls(boxes=dets.xyxy, labels=dets.class_id, scores=dets.confidence, polygons=polygons, areas=areas)

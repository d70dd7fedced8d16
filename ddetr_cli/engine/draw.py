"""Annotated images: boxes, names, scores (and masks) drawn over an image, and image writing.

Used by ``detect`` (``annotated/``) and ``video`` (frames and ``--save-frames``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import supervision as sv

from ddetr_cli.files import atomic_path
from ddetr_cli.formats.labels import LabelTable


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

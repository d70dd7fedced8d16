"""Annotated images: boxes, names, scores (and masks) drawn over an image, panoptic segment maps,
and image writing.

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
from ddetr_cli.formats.panoptic import Panoptic


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

    def draw_panoptic(self, image_bgr: np.ndarray, result: Panoptic) -> np.ndarray:
        """(H, W, 3) uint8 BGR -> a copy showing the segment map (see :func:`draw_panoptic`)."""
        return draw_panoptic(image_bgr, result, self.table)


def segment_color(category_id: int, instance: int = 0, isthing: bool = True) -> tuple[int, int, int]:
    """A BGR colour per category, stable across images; thing instances of one category vary in
    brightness so that neighbours stay apart; stuff is drawn paler."""
    rng = np.random.default_rng(int(category_id) * 7919 + 17)
    hsv = np.array([[[rng.integers(0, 180), rng.integers(150, 256) if isthing else rng.integers(60, 130),
                      max(90, 255 - 40 * (instance % 4))]]], np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw_panoptic(image_bgr: np.ndarray, result: Panoptic, labels: LabelTable, opacity: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8 BGR -> a copy with each segment filled translucent in its category's
    colour, outlined, and named (with its score) at the pixel deepest inside it."""
    frame = image_bgr.copy()
    segmap = np.asarray(result.segmap)
    color = np.zeros_like(frame)
    seen: dict[int, int] = {}
    named = []
    for s in result.segments:
        cat = labels.get(s.label)
        m = segmap == s.id
        if cat is None or not m.any():
            continue
        seen[cat.id] = seen.get(cat.id, -1) + 1
        color[m] = segment_color(cat.id, seen[cat.id], cat.isthing)
        named.append((s, cat, m))
    painted = segmap > 0
    frame[painted] = (frame[painted] * (1 - opacity) + color[painted] * opacity).astype(np.uint8)
    edges = cv2.morphologyEx(segmap.astype(np.float32), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    frame[edges & painted] = (255, 255, 255)
    for s, cat, m in named:
        dist = cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        text = cat.name if s.score is None else f"{cat.name} {s.score:.2f}"
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        x0 = int(min(max(x - tw // 2, 0), max(frame.shape[1] - tw, 0)))
        y0 = int(min(max(y + th // 2, th), frame.shape[0] - 1))
        cv2.rectangle(frame, (x0 - 2, y0 - th - 2), (x0 + tw + 2, y0 + 3), (0, 0, 0), -1)
        cv2.putText(frame, text, (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return frame


def write_image(path: Path, image_bgr: np.ndarray) -> None:
    """Encode by ``path``'s suffix (JPEG, PNG, ...) and write atomically."""
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image_bgr):
            raise OSError(f"cannot write {path}")

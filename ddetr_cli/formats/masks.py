"""Instance masks -> COCO polygons: the one conversion behind detect, video, eval and synth.

COCO polygons are in pixel-edge coordinates (pixel ``(x, y)`` spans ``[x, x+1) x [y, y+1)``) and
pycocotools fills a pixel when its centre lies inside. Contours are therefore traced along pixel
*edges*, not through pixel centres (which would lose half a pixel all round: a 4x4 mask would
come back 3x3), so an unsimplified polygon rasterises back to exactly its mask.

Holes: a COCO segmentation is a *union* of polygons, so a hole cannot be a polygon of its own,
and filling holes would cost a ring (a synth class) half its IoU. Each hole is instead joined to
the outer boundary by a zero-width cut (one segment walked there and back) and walked in the
opposite direction, so that both the even-odd rule (pycocotools) and the non-zero rule (SVG and
canvas drawing in CVAT and Label Studio) leave it empty. Separate parts stay separate polygons.

Label Studio rejects RLE, and CVAT imports polygons as editable shapes, so polygons are what
``predictions.json`` and the video JSON lines carry.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# models the error for ``--masks`` suggests (DETR's panoptic model has the mask head)
MASK_MODEL_EXAMPLES = ("detr-resnet-50-panoptic",)

# largest distance (pixels) a simplified edge may stray from the traced one: a circle of radius
# 50 keeps 20 of its 364 staircase vertices and 99% IoU, which keeps polygons editable in
# labeling tools. A part whose simplified ring would lose more than MIN_KEEP_IOU (thin lines,
# tiny objects) is tried at half the tolerance, then kept exact.
SIMPLIFY_PX = 1.0
MIN_KEEP_IOU = 0.98


class MasksUnavailable(ValueError):
    """``--masks`` asked of a model without a mask head; the message is one line."""


def require_masks(detector: object, name: str | None = None, flag: str = "--masks") -> None:
    """Raise MasksUnavailable unless ``detector.cfg.masks`` is true (the model has a mask head);
    ``flag`` names the option that asked for it."""
    if getattr(getattr(detector, "cfg", None), "masks", False):
        return
    which = f"model {name!r}" if name else "this model"
    raise MasksUnavailable(f"{flag} needs a model with a mask head ({which} has none); "
                           f"use one such as {', '.join(MASK_MODEL_EXAMPLES)}")


def _signed_area(points: np.ndarray) -> float:
    """Shoelace area of a closed (K, 2) polygon; the sign gives the orientation."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _oriented(points: np.ndarray, positive: bool) -> np.ndarray:
    return points if (_signed_area(points) > 0) == positive else points[::-1]


def _bridge(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One (K, 2) ring: ``outer``, a cut to the nearest vertex of ``hole``, around it and back."""
    d = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return np.concatenate([outer[: i + 1], hole[j:], hole[: j + 1], outer[i:]])


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker (OpenCV) on a closed ring in half-pixel units; never below 3 points."""
    if tolerance <= 0 or len(points) <= 3:
        return points
    out = cv2.approxPolyDP(points.reshape(-1, 1, 2).astype(np.int32), tolerance, True).reshape(-1, 2)
    return out if len(out) >= 3 else points


def mask_to_polygons(mask: np.ndarray, simplify: float = SIMPLIFY_PX) -> list[list[float]]:
    """(H, W) bool mask -> COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` (pixel-edge coordinates).

    One polygon per 8-connected part, its holes joined in by zero-width cuts (see the module
    docstring); every polygon has at least 3 points, all within ``0..W`` x ``0..H``. ``simplify``
    is the Douglas-Peucker tolerance in pixels (0 keeps every vertex: an exact round trip through
    pycocotools); a part is simplified only where that keeps MIN_KEEP_IOU of its pixels. An empty
    mask gives ``[]``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return []
    y0, x0 = int(rows[0]), int(cols[0])
    crop = mask[y0 : int(rows[-1]) + 1, x0 : int(cols[-1]) + 1]
    h, w = crop.shape
    # A grid at half-pixel resolution: grid point k <-> edge coordinate k / 2. Each pixel becomes
    # the 3x3 block of its corners, edge midpoints and centre, so the traced boundary of the
    # blocks runs along pixel edges; one zero row/column around keeps it off the grid's border.
    grid = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)
    grid[2 : 2 * h + 1 : 2, 2 : 2 * w + 1 : 2] = crop
    grid = cv2.dilate(grid, np.ones((3, 3), np.uint8))
    contours, hierarchy = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]  # per contour: next, previous, first child, parent
    polygons = []
    for idx, c in enumerate(contours):
        if hierarchy[idx][3] != -1:
            continue  # a hole: joined to its outer boundary below
        holes, child = [], hierarchy[idx][2]
        while child != -1:
            holes.append(contours[child].reshape(-1, 2))
            child = hierarchy[child][0]
        ring = _part_ring(c.reshape(-1, 2), holes, simplify, h, w)
        xy = (ring.astype(np.float64) - 1.0) / 2.0 + (x0, y0)
        polygons.append([float(v) for v in xy.reshape(-1)])
    return polygons


def _ring_of(outer: np.ndarray, holes: Sequence[np.ndarray], tol: float) -> np.ndarray:
    """Outer boundary and holes (grid units) simplified by ``tol`` and joined into one ring."""
    ring = _oriented(_simplify(outer, tol), positive=True)
    for hole in holes:
        ring = _bridge(ring, _oriented(_simplify(hole, tol), positive=False))
    return ring


def _pixels(ring: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w) bool: the pixels of the crop that pycocotools fills for a ring in grid units.

    pycocotools is the rasteriser the consumers of these polygons use (COCOeval, CVAT's
    Datumaro), so simplification is judged by its rule, not by an approximation of it.
    """
    from pycocotools import mask as mask_utils

    xy = (ring.astype(np.float64) - 1.0) / 2.0
    rle = mask_utils.frPyObjects([xy.reshape(-1).tolist()], h, w)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _part_ring(outer: np.ndarray, holes: Sequence[np.ndarray], simplify: float, h: int, w: int) -> np.ndarray:
    """The simplest ring (tolerance ``simplify``, then half of it) that keeps >= MIN_KEEP_IOU of
    the part's pixels; the exact ring when none does (thin lines, tiny objects)."""
    exact = _ring_of(outer, holes, 0.0)
    if simplify <= 0:
        return exact
    ref = _pixels(exact, h, w)
    for tol in (2.0 * simplify, simplify):  # grid units are half pixels
        ring = _ring_of(outer, holes, tol)
        got = _pixels(ring, h, w)
        if np.count_nonzero(got & ref) >= MIN_KEEP_IOU * np.count_nonzero(got | ref):
            return ring
    return exact


def join_polygons(polygons: Sequence[Sequence[float]]) -> list[float]:
    """Several COCO polygons of one instance -> one ring (zero-width cuts between the parts).

    For formats with one polygon per instance (YOLO segmentation); under the even-odd or the
    non-zero rule the ring covers the same pixels as the parts. ``[]`` in, ``[]`` out.
    """
    rings = [np.asarray(p, np.float64).reshape(-1, 2) for p in polygons if len(p) >= 6]
    if not rings:
        return []
    ring = _oriented(rings[0], positive=True)
    for other in rings[1:]:
        ring = _bridge(ring, _oriented(other, positive=True))
    return [float(v) for v in ring.reshape(-1)]


def mask_area(mask: np.ndarray) -> int:
    """Pixel count of a (H, W) mask: COCO's ``area`` of a segmented object."""
    return int(np.count_nonzero(mask))


def instance_polygons(dets: object) -> list[list[list[float]]] | None:
    """COCO polygons of each detection's mask (``dets.mask`` (N, H, W) bool); None without masks.

    Computed once per image and shared by every writer (COCO, YOLO, JSON lines).
    """
    masks = getattr(dets, "mask", None)
    if masks is None:
        return None
    return [mask_to_polygons(m) for m in masks]


def segmentation_to_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, or RLE with string or list counts) -> (H, W) bool mask.

    Decoded by pycocotools, the reference reader; an RLE keeps its own ``size``.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif segmentation:
        rle = mask_utils.merge(mask_utils.frPyObjects([list(p) for p in segmentation], height, width))
    else:
        return np.zeros((height, width), bool)
    return mask_utils.decode(rle).astype(bool)

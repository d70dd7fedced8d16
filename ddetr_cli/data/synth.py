"""Deterministic synthetic detection data: images, a video clip and datasets in COCO, YOLO and VOC.

Five classes of flat shapes (``CLASS_NAMES``), each with its own hue range, are drawn with OpenCV
over textured backgrounds (smooth noise, gradients, stripes). Objects vary in scale and may
occlude each other; every box is the tight box of the *visible* pixels of its shape, and objects
less than ``MIN_VISIBLE`` visible are left out of the annotations. The COCO files also hold each
object's visible pixels as ``segmentation`` polygons (``masks.mask_to_polygons``) with ``area``
their pixel count; YOLO and VOC hold boxes only. The files are written by the writers ``ddetr detect``
uses (``formats.coco`` / ``yolo`` / ``voc``).

Boxes use the pixel-edge convention: a shape covering columns ``a..b`` has ``x1 = a``, ``x2 = b + 1``.

Regenerate the committed ``examples/`` folder with::

    python -m ddetr_cli.data.synth examples

and write a bigger dataset with, e.g.::

    python -m ddetr_cli.data.synth dataset /tmp/shapes --train 400 --val 100 --test 50

or a panoptic one (shapes as things over sky and ground as stuff; COCO panoptic PNG + JSON and
the same segments as a COCO instance file)::

    python -m ddetr_cli.data.synth panoptic /tmp/panoptic --train 200 --val 50
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from ddetr_cli.formats.annotations import Instances, names_txt
from ddetr_cli.formats.coco import CocoWriter
from ddetr_cli.formats.labels import Category, LabelTable
from ddetr_cli.formats.masks import mask_area, mask_to_polygons
from ddetr_cli.formats.mot import write_mot_sequence
from ddetr_cli.formats.panoptic import Panoptic, PanopticWriter, Segment
from ddetr_cli.formats.voc import voc_image_set, voc_xml
from ddetr_cli.formats.yolo import yolo_data_yaml, yolo_lines

CLASS_NAMES: list[str] = ["circle", "square", "triangle", "cross", "ring"]

# OpenCV hue ranges (0..180) per class, in CLASS_NAMES order: red, green, blue, yellow, magenta.
_HUE_RANGES: list[tuple[int, int]] = [(0, 8), (48, 72), (102, 124), (22, 32), (140, 162)]

MIN_VISIBLE = 0.3  # objects less visible than this are not annotated
_PLACE_VISIBLE = 0.5  # placement keeps every earlier object at least this visible
_JPEG_QUALITY = 90
_SPLIT_DIRS = {  # split -> folder name per format
    "train": {"coco": "train", "yolo": "train", "voc": "train"},
    "val": {"coco": "valid", "yolo": "val", "voc": "val"},
    "test": {"coco": "test", "yolo": "test", "voc": "test"},
}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
FORMATS = ("coco", "yolo", "voc")


@dataclass
class _Shape:
    """One object: class index, centre (px), radius (px), rotation (deg), aspect and BGR colour."""

    label: int
    cx: float
    cy: float
    r: float
    angle: float
    aspect: float
    color: tuple[int, int, int]


# --------------------------------------------------------------------------- drawing


def _rotated(points: np.ndarray, cx: float, cy: float, angle_deg: float) -> np.ndarray:
    """Rotate (N, 2) points about the origin, move them to (cx, cy); return (N, 2) int32."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    out = points @ rot.T + np.array([cx, cy])
    return np.round(out).astype(np.int32)


def _shape_mask(shape: _Shape, width: int, height: int) -> np.ndarray:
    """Rasterise one shape; returns a (H, W) bool mask."""
    mask = np.zeros((height, width), np.uint8)
    name = CLASS_NAMES[shape.label]
    r, c = shape.r, (int(round(shape.cx)), int(round(shape.cy)))
    if name == "circle":
        cv2.circle(mask, c, int(round(r)), 1, -1)
    elif name == "square":
        s = 0.8 * r
        pts = np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
        cv2.fillPoly(mask, [_rotated(pts, shape.cx, shape.cy, shape.angle)], 1)
    elif name == "triangle":
        t = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        cv2.fillPoly(mask, [_rotated(pts, shape.cx, shape.cy, shape.angle)], 1)
    elif name == "cross":
        w = 0.3 * r
        pts = np.array([[-w, -r], [w, -r], [w, -w], [r, -w], [r, w], [w, w],
                        [w, r], [-w, r], [-w, w], [-r, w], [-r, -w], [-w, -w]])
        cv2.fillPoly(mask, [_rotated(pts, shape.cx, shape.cy, shape.angle)], 1)
    elif name == "ring":
        t = max(2, int(round(0.3 * r)))
        axes = (max(1, int(round(r - t / 2))), max(1, int(round((r - t / 2) * shape.aspect))))
        cv2.ellipse(mask, c, axes, shape.angle, 0, 360, 1, thickness=t)
    else:  # pragma: no cover - CLASS_NAMES and this function go together
        raise ValueError(f"unknown shape {name!r}")
    return mask.astype(bool)


def _random_color(rng: np.random.Generator, label: int) -> tuple[int, int, int]:
    """A saturated BGR colour whose hue lies in the class's range."""
    lo, hi = _HUE_RANGES[label]
    hsv = np.array([[[rng.integers(lo, hi + 1) % 180, rng.integers(150, 256),
                      rng.integers(140, 256)]]], np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A low-saturation textured background: (H, W, 3) float32 BGR in 0..255."""
    kind = rng.integers(0, 3)
    base = rng.uniform(60, 200) + rng.uniform(-25, 25, size=3)
    other = rng.uniform(40, 220) + rng.uniform(-25, 25, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:  # smooth noise blobs
        cell = int(rng.integers(12, 48))
        small = rng.random((height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        noise = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        img = base + (noise - 0.5) * rng.uniform(40, 110)
    elif kind == 1:  # linear gradient between two colours
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        img = base + t[..., None] * (other - base)
    else:  # stripes
        a = rng.uniform(0, np.pi)
        period = rng.uniform(8, 40)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
        img = base + t[..., None] * (other - base) * rng.uniform(0.3, 0.8)
    return img.astype(np.float32)


def _paint(canvas: np.ndarray, mask: np.ndarray, shape: _Shape, rng: np.random.Generator) -> None:
    """Fill `mask` of the (H, W, 3) float32 canvas with the shape's colour, shading and grain."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return
    a = rng.uniform(0, 2 * np.pi)
    d = ((xs - shape.cx) * np.cos(a) + (ys - shape.cy) * np.sin(a)) / max(shape.r, 1.0)
    shade = 1.0 + 0.18 * d
    color = np.array(shape.color, np.float32)
    grain = rng.normal(0, 6, size=(len(xs), 3))
    canvas[ys, xs] = color[None, :] * shade[:, None] + grain


def _owners(masks: list[np.ndarray]) -> np.ndarray:
    """Stack objects in order (later on top): (H, W) int32 index of the object seen at each pixel, -1 none."""
    owner = np.full(masks[0].shape, -1, np.int32)
    for i, m in enumerate(masks):
        owner[m] = i
    return owner


def _visible_boxes(masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack objects in order (later on top); return (K, 4) int xyxy boxes and (K,) visible ratios."""
    if not masks:
        return np.zeros((0, 4), np.int64), np.zeros((0,), np.float64)
    owner = _owners(masks)
    boxes, ratios = [], []
    for i, m in enumerate(masks):
        vis = owner == i
        area = int(m.sum())
        n_vis = int(vis.sum())
        ratios.append(n_vis / area if area else 0.0)
        if n_vis == 0:
            boxes.append((0, 0, 0, 0))
            continue
        ys, xs = np.nonzero(vis)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return np.array(boxes, np.int64), np.array(ratios)


def _random_shape(rng: np.random.Generator, width: int, height: int, label: int | None = None,
                  r: float | None = None) -> _Shape:
    """A random shape that lies fully inside a (width, height) frame."""
    side = min(width, height)
    label = int(rng.integers(0, len(CLASS_NAMES))) if label is None else label
    if r is None:  # log-uniform scale, small to large
        r = float(np.exp(rng.uniform(np.log(0.04 * side), np.log(0.28 * side))))
    r = max(r, 6.0)
    cx = rng.uniform(r + 1, width - r - 2)
    cy = rng.uniform(r + 1, height - r - 2)
    return _Shape(label=label, cx=cx, cy=cy, r=r, angle=float(rng.uniform(0, 360)),
                  aspect=float(rng.uniform(0.6, 1.0)), color=_random_color(rng, label))


def render_scene(rng: np.random.Generator, width: int, height: int,
                 n_objects: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one random scene.

    Returns:
        image: (H, W, 3) uint8 BGR.
        boxes: (K, 4) float32 xyxy in pixels (edge convention), visible part only.
        labels: (K,) int64 indices into CLASS_NAMES.
    """
    image, boxes, labels, _ = render_scene_masks(rng, width, height, n_objects)
    return image, boxes, labels


def render_scene_masks(rng: np.random.Generator, width: int, height: int,
                       n_objects: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``render_scene`` plus masks: (K, H, W) bool, the visible pixels of each annotated object
    (the pixels its box is the tight box of). Same random draws, so the same scene."""
    shapes, masks = _place_shapes(rng, width, height, n_objects)
    canvas = _background(rng, width, height)
    return _finish_scene(rng, canvas, shapes, masks)


def _place_shapes(rng: np.random.Generator, width: int, height: int,
                  n_objects: int | None) -> tuple[list[_Shape], list[np.ndarray]]:
    """1-8 random shapes (or ``n_objects``), each placed so that earlier ones stay visible."""
    n = int(rng.integers(1, 9)) if n_objects is None else n_objects
    shapes: list[_Shape] = []
    masks: list[np.ndarray] = []
    for _ in range(n):
        for _try in range(20):  # rejection: do not bury earlier objects
            s = _random_shape(rng, width, height)
            m = _shape_mask(s, width, height)
            _, ratios = _visible_boxes(masks + [m])
            if ratios.min() >= _PLACE_VISIBLE:
                shapes.append(s)
                masks.append(m)
                break
    return shapes, masks


def _finish_scene(rng: np.random.Generator, canvas: np.ndarray, shapes: list[_Shape],
                  masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paint the shapes over the (H, W, 3) float32 background, add grain -> image, boxes,
    labels and visible masks of the annotated objects (see ``render_scene_masks``)."""
    height, width = canvas.shape[:2]
    for s, m in zip(shapes, masks):
        _paint(canvas, m, s, rng)
    canvas += rng.normal(0, 4, size=canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    boxes, ratios = _visible_boxes(masks)
    keep = ratios >= MIN_VISIBLE
    labels = np.array([s.label for s in shapes], np.int64)
    owner = _owners(masks) if masks else np.full((height, width), -1, np.int32)
    visible = np.stack([owner == i for i in np.flatnonzero(keep)]) if keep.any() else np.zeros((0, height, width), bool)
    return image, boxes[keep].astype(np.float32), labels[keep], visible


STUFF_NAMES: list[str] = ["sky", "ground"]  # panoptic scenes: labels 5, 6 after the shapes


def _stuff_background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A pale smooth "sky" over a darker, grainy "ground", split by a wavy horizon; both of low
    saturation, so that no shape's hue range is used -> (canvas (H, W, 3) float32 BGR, sky (H, W) bool)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = rng.uniform(0.3, 0.7) * height + rng.uniform(0.0, 0.08) * height * np.sin(
        2 * np.pi * xx / (rng.uniform(0.5, 1.5) * width) + rng.uniform(0, 2 * np.pi))
    sky = yy < horizon
    top = cv2.cvtColor(np.array([[[rng.integers(95, 115), rng.integers(25, 70), rng.integers(200, 245)]]], np.uint8),
                       cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
    low = cv2.cvtColor(np.array([[[rng.integers(12, 30), rng.integers(40, 90), rng.integers(70, 130)]]], np.uint8),
                       cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
    t = (yy / max(height - 1, 1))[..., None]
    cell = int(rng.integers(4, 12))
    noise = cv2.resize(rng.random((height // cell + 2, width // cell + 2, 1)).astype(np.float32), (width, height),
                       interpolation=cv2.INTER_NEAREST)[..., None]
    canvas = np.where(sky[..., None], top * (1.0 - 0.15 * t), low * (0.8 + 0.4 * noise))
    return canvas.astype(np.float32), sky


def render_panoptic_scene(rng: np.random.Generator, width: int, height: int,
                          n_objects: int | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A scene for panoptic segmentation: the shapes (things) over sky and ground (stuff).

    Returns:
        image: (H, W, 3) uint8 BGR.
        segmap: (H, W) int32 segment ids: 1..K the annotated shapes (their visible pixels), then
            one id each for the sky and the ground left visible; 0 (unlabeled) on shapes less
            than ``MIN_VISIBLE`` visible.
        labels: per segment id 1, 2, ... its label: shapes 0..4 (``CLASS_NAMES``), sky 5, ground 6.
    """
    shapes, masks = _place_shapes(rng, width, height, n_objects)
    canvas, sky = _stuff_background(rng, width, height)
    image, _, labels, visible = _finish_scene(rng, canvas, shapes, masks)
    segmap = np.zeros((height, width), np.int32)
    covered = np.zeros((height, width), bool)
    for m in masks:
        covered |= m
    seg_labels = []
    for k, m in enumerate(visible):
        segmap[m] = k + 1
        seg_labels.append(int(labels[k]))
    for i, region in enumerate((sky, ~sky)):
        region = region & ~covered
        if region.any():
            seg_labels.append(len(CLASS_NAMES) + i)
            segmap[region] = len(seg_labels)
    return image, segmap, seg_labels


def _encode_jpeg(image: np.ndarray) -> bytes:
    """Encode a (H, W, 3) uint8 BGR image as JPEG with a fixed quality."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:  # pragma: no cover
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()


# --------------------------------------------------------------------------- writing

_INFO = {"description": "ddetr synthetic shapes", "version": "1.0"}
_YAML_COMMENTS = ("Synthetic shapes written by ddetr_cli.data.synth.",
                  "No 'path' key on purpose: tools then resolve the split folders relative to",
                  "this file's folder ('path: .' would mean the current directory to ultralytics).")


def label_table() -> LabelTable:
    """CLASS_NAMES as categories 1..5 (COCO), YOLO classes 0..4, supercategory "shape"."""
    return LabelTable([Category(label=i, id=i + 1, name=n, yolo=i, supercategory="shape")
                       for i, n in enumerate(CLASS_NAMES)], len(CLASS_NAMES))


def panoptic_label_table() -> LabelTable:
    """The shapes (things, ids 1..5) and ``STUFF_NAMES`` (stuff, ids 6, 7)."""
    names = CLASS_NAMES + STUFF_NAMES
    return LabelTable([Category(label=i, id=i + 1, name=n, yolo=i, supercategory="shape" if i < len(CLASS_NAMES) else "scene",
                                isthing=i < len(CLASS_NAMES)) for i, n in enumerate(names)], len(names))


def generate_panoptic(out: Path, *, n_train: int, n_val: int, size: tuple[int, int] = (320, 240),
                      seed: int = 0) -> dict:
    """Write a synthetic panoptic dataset (``render_panoptic_scene``) under ``out`` in COCO's
    layout: images in ``<split>/``, ``annotations/panoptic_<split>.json`` with its PNGs in
    ``annotations/panoptic_<split>/`` (``formats.panoptic.PanopticWriter``), and the same
    segments as a COCO instance file ``annotations/instances_<split>.json`` (things and stuff
    as polygons, categories with ``isthing``) that ``ddetr finetune`` trains a mask head on.
    Image ``i`` of a split depends only on (seed, split, i). ``size`` is (width, height)."""
    out = Path(out)
    width, height = size
    table = panoptic_label_table()
    counts = {"train": n_train, "val": n_val}
    segments = 0
    for split in (s for s in ("train", "val") if counts[s] > 0):
        pan = PanopticWriter(table, out / "annotations" / f"panoptic_{split}")
        coco = CocoWriter(table)
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, 10 + _SPLIT_CODE[split], i])
            image, segmap, labels = render_panoptic_scene(rng, width, height)
            name = f"{split}_{i:05d}.jpg"
            _write(out / split / name, _encode_jpeg(image))
            pan.add(name, width, height, Panoptic(segmap, [Segment(k + 1, lab) for k, lab in enumerate(labels)]))
            masks = [segmap == k + 1 for k in range(len(labels))]
            boxes = []
            for m in masks:
                ys, xs = np.nonzero(m)
                boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
            coco.add(name, width, height, Instances(boxes=np.array(boxes, np.int64).reshape(-1, 4), labels=np.array(labels),
                                                    polygons=[mask_to_polygons(m, simplify=0) for m in masks],
                                                    areas=[mask_area(m) for m in masks]))
            segments += len(labels)
        pan.write(out / "annotations" / f"panoptic_{split}.json", _INFO)
        coco.write(out / "annotations" / f"instances_{split}.json", _INFO)
    return {"root": str(out), "splits": counts, "segments": segments}


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def generate(out: Path, *, n_train: int, n_val: int, n_test: int = 0,
             size: tuple[int, int] = (320, 240), seed: int = 0,
             formats: tuple[str, ...] | list[str] = FORMATS) -> dict:
    """Write a synthetic dataset in COCO (roboflow layout), YOLO and/or Pascal VOC under `out`.

    Every format holds the same images (file names ``<split>_<index>.jpg``) and boxes.
    Image ``i`` of a split depends only on (seed, split, i), so growing ``n_train`` keeps the
    first images unchanged. `size` is (width, height).

    Returns a summary: {"root", "formats", "splits": {split: n_images}, "boxes": n_boxes,
    "paths": {format: folder}}.
    """
    out = Path(out)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; expected some of {list(FORMATS)}")
    width, height = size
    counts = {"train": n_train, "val": n_val, "test": n_test}
    splits = [s for s in ("train", "val", "test") if counts[s] > 0]
    n_boxes = 0
    table = label_table()
    for split in splits:
        items = []
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
            image, boxes, labels, masks = render_scene_masks(rng, width, height)
            # integer boxes: the pixel grid (COCO writes them as integers); areas: visible pixels
            polygons = [mask_to_polygons(m) for m in masks] if "coco" in formats else None
            objects = Instances(boxes=boxes.astype(np.int64), labels=labels, polygons=polygons,
                                areas=[mask_area(m) for m in masks])
            items.append({"file_name": f"{split}_{i:05d}.jpg", "objects": objects, "jpeg": _encode_jpeg(image)})
            n_boxes += len(boxes)
        if "coco" in formats:
            d = out / "coco" / _SPLIT_DIRS[split]["coco"]
            coco = CocoWriter(table)
            for it in items:
                _write(d / it["file_name"], it["jpeg"])
                coco.add(it["file_name"], width, height, it["objects"])
            _write(d / "_annotations.coco.json", coco.dumps(_INFO, readable=True))
        if "yolo" in formats:
            d = out / "yolo"
            for it in items:  # boxes only: YOLO detection labels
                _write(d / "images" / split / it["file_name"], it["jpeg"])
                _write(d / "labels" / split / (Path(it["file_name"]).stem + ".txt"),
                       yolo_lines(replace(it["objects"], polygons=None), width, height, table))
        if "voc" in formats:
            d = out / "voc"
            for it in items:
                _write(d / "JPEGImages" / it["file_name"], it["jpeg"])
                _write(d / "Annotations" / (Path(it["file_name"]).stem + ".xml"),
                       voc_xml(it["file_name"], width, height, it["objects"], table, database=_INFO["description"]))
            _write(d / "ImageSets" / "Main" / f"{split}.txt", voc_image_set(Path(it["file_name"]).stem for it in items))
    if "yolo" in formats:
        yolo_splits = {"train": "images/train", "val": "images/val", "test": "images/test" if "test" in splits else None}
        _write(out / "yolo" / "data.yaml", yolo_data_yaml(table, yolo_splits, comments=_YAML_COMMENTS, names_list=True))
    if "voc" in formats:  # VOC has no class list of its own; keep the class order explicit
        _write(out / "voc" / "labels.txt", names_txt(table))
    return {"root": str(out), "formats": list(formats),
            "splits": {s: counts[s] for s in splits}, "boxes": n_boxes,
            "paths": {f: str(out / f) for f in formats}}


# --------------------------------------------------------------------------- video


def _write_video(path: Path, frames: list[np.ndarray], fps: int) -> str:
    """Write (H, W, 3) uint8 BGR frames as H.264 MP4 with PyAV, else mp4v with OpenCV.

    Returns the codec used ("h264" or "mp4v").
    """
    height, width = frames[0].shape[:2]
    try:
        import av

        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "23", "preset": "medium"}
            for f in frames:
                vf = av.VideoFrame.from_ndarray(cv2.cvtColor(f, cv2.COLOR_BGR2RGB), format="rgb24")
                for packet in stream.encode(vf):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return "h264"
    except Exception:  # PyAV missing or built without libx264: fall back to OpenCV
        path.unlink(missing_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError(f"cannot open a video writer for {path}")
        for f in frames:
            writer.write(f)
        writer.release()
        return "mp4v"


CLIP_SCENES: dict[str, str] = {
    "lines": "2-5 shapes in straight lines at constant speed (the bundled examples/clip.mp4)",
    "crowd": "9 smaller shapes in straight lines: more objects, passing over each other",
    "crossing": "3 pairs of same-class shapes that swap places, crossing (and hiding) each other mid-clip",
    "occluder": "4 shapes moving sideways behind a grey pillar that hides each for several frames",
    "fast": "4 shapes bouncing off the frame edges at ~4x the speed of 'lines'",
    "dropped": "'lines', as a stream that lost 1-3 frames at a time (about a third of them): objects jump",
}


def _scene_tracks(scene: str, rng: np.random.Generator, width: int, height: int,
                  frames: int) -> tuple[list[_Shape], np.ndarray, np.ndarray | None]:
    """Objects and their motion: (shapes, (T, K, 2) centres per frame, (H, W) bool occluder or None)."""
    side = min(width, height)
    a = np.arange(frames) / max(frames - 1, 1)  # the clip's progress, 0 -> 1
    if scene in ("lines", "dropped", "crowd"):
        # "lines" keeps its first draws: the committed examples/clip.mp4 is this scene, seed 0
        n = int(rng.integers(2, 6)) if scene != "crowd" else 9
        lo, hi = (0.07, 0.18) if scene != "crowd" else (0.05, 0.1)
        shapes, centres = [], []
        for k in range(n):
            r = float(rng.uniform(lo, hi) * side)
            start = _random_shape(rng, width, height, label=k % len(CLASS_NAMES), r=r)
            end = _random_shape(rng, width, height, label=start.label, r=r)
            shapes.append(start)
            centres.append(np.stack([start.cx + a * (end.cx - start.cx), start.cy + a * (end.cy - start.cy)], 1))
        return shapes, np.stack(centres, 1), None
    if scene == "crossing":
        shapes, centres = [], []
        for k in range(3):  # pair k meets at its own x, at the middle of the clip
            r = float(rng.uniform(0.08, 0.11) * side)
            label = int(rng.integers(0, len(CLASS_NAMES)))
            y = (k + 0.5) * height / 3
            x = width * (0.3 + 0.2 * k)
            dx = min(x - r - 1, width - x - r - 2)
            dy = float(rng.uniform(-0.2, 0.2) * height / 3)
            for sign in (1, -1):  # the two shapes of a pair move in opposite directions
                s = _random_shape(rng, width, height, label=label, r=r)
                centres.append(np.stack([x - sign * dx * (1 - 2 * a), y - sign * dy * (1 - 2 * a) + sign * 0.25 * r], 1))
                shapes.append(s)
        return shapes, np.stack(centres, 1), None
    if scene == "occluder":
        shapes, centres = [], []
        for k in range(4):
            r = float(rng.uniform(0.07, 0.1) * side)
            s = _random_shape(rng, width, height, label=k % len(CLASS_NAMES), r=r)
            y = (k + 0.5) * height / 4
            x0, x1 = (r + 1, width - r - 2) if k % 2 == 0 else (width - r - 2, r + 1)
            shapes.append(s)
            centres.append(np.stack([x0 + a * (x1 - x0), np.full_like(a, y)], 1))
        pillar = np.zeros((height, width), bool)
        half = int(round(0.11 * side))
        pillar[:, width // 2 - half : width // 2 + half] = True
        return shapes, np.stack(centres, 1), pillar
    if scene == "fast":
        shapes, centres = [], []
        for k in range(4):
            r = float(rng.uniform(0.07, 0.12) * side)
            s = _random_shape(rng, width, height, label=k % len(CLASS_NAMES), r=r)
            ang = rng.uniform(0, 2 * np.pi)
            speed = 0.06 * side  # px per frame: "lines" moves ~0.015 side per frame at 45 frames
            lo = np.array([r + 1, r + 1])
            span = np.array([width - r - 2, height - r - 2]) - lo
            raw = np.array([s.cx, s.cy])[None] - lo + np.arange(frames)[:, None] * speed * np.array([np.cos(ang), np.sin(ang)])[None]
            folded = np.abs((raw + span) % (2 * span) - span)  # reflect off the edges
            shapes.append(s)
            centres.append(lo + folded)
        return shapes, np.stack(centres, 1), None
    raise ValueError(f"unknown clip scene {scene!r}; choose from {', '.join(CLIP_SCENES)}")


def make_clip(path: Path, *, frames: int = 60, size: tuple[int, int] = (320, 240), fps: int = 15,
              seed: int = 0, scene: str = "lines") -> list[dict]:
    """Write a clip of moving shapes (``scene``: one of ``CLIP_SCENES``), every shape inside the frame.

    `size` is (width, height); both should be even for yuv420p. Returns one dict per frame of the
    written video: {"frame": int, "boxes": (K, 4) float32 xyxy px of the visible part, "labels": (K,)
    int64, "ids": (K,) int64 object ids, stable across frames, "visibility": (K,) visible share}.
    Objects less than ``MIN_VISIBLE`` visible in a frame (under another shape or the "occluder"
    pillar) are absent from that frame's ground truth. "dropped" renders ``frames`` frames and
    writes only those a lossy stream kept, numbered as written (``source_frame`` in each dict says
    which rendered frame it was).
    """
    images, truth = render_clip(frames=frames, size=size, seed=seed, scene=scene)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_video(path, images, fps)
    return truth


def make_mot_sequence(seq: Path, *, frames: int = 60, size: tuple[int, int] = (320, 240), fps: int = 15, seed: int = 0,
                      scene: str = "lines", im_ext: str = ".png") -> list[dict]:
    """``make_clip``'s clip as a MOTChallenge sequence folder (``seqinfo.ini``, ``img1/000001.png``
    ..., ``gt/gt.txt`` with ids from 1, every object of the target class 1, its visibility).
    ``im_ext`` ".png" keeps the rendered pixels exactly; ".jpg" is MOTChallenge's own. Returns
    the same ground truth as ``make_clip`` (0-based ids)."""
    images, truth = render_clip(frames=frames, size=size, seed=seed, scene=scene)
    encoded = [cv2.imencode(im_ext, im)[1].tobytes() for im in images]
    gt = {t["frame"]: (t["ids"] + 1, t["boxes"].astype(np.float64)) for t in truth}
    write_mot_sequence(seq, encoded, gt, fps=fps, size=size, im_ext=im_ext,
                       visibility={t["frame"]: t["visibility"] for t in truth})
    return truth


def render_clip(*, frames: int = 60, size: tuple[int, int] = (320, 240), seed: int = 0,
                scene: str = "lines") -> tuple[list[np.ndarray], list[dict]]:
    """The frames ((H, W, 3) uint8 BGR) and ground truth of ``make_clip``, without writing them."""
    width, height = size
    rng = np.random.default_rng([seed, 7])
    shapes, centres, occluder = _scene_tracks(scene, rng, width, height, frames)
    n = len(shapes)
    background = _background(rng, width, height)
    kept = np.arange(frames)
    if scene == "dropped":
        drop_rng = np.random.default_rng([seed, 9])
        lost = np.zeros(frames, bool)
        t = 2
        while t < frames - 1:  # runs of 1-3 lost frames, about one frame in three overall
            run = int(drop_rng.integers(1, 4))
            lost[t : t + run] = True
            t += run + int(drop_rng.integers(2, 6))
        kept = np.flatnonzero(~lost)
    images, truth = [], []
    for out_index, t in enumerate(kept):
        shapes_t = [replace(s, cx=float(c[0]), cy=float(c[1])) for s, c in zip(shapes, centres[t])]
        masks = [_shape_mask(s, width, height) for s in shapes_t]
        canvas = background.copy()
        frame_rng = np.random.default_rng([seed, 8, int(t)])
        for s, m in zip(shapes_t, masks):
            _paint(canvas, m, s, frame_rng)
        if occluder is not None:  # a grey pillar in front of every shape
            canvas[occluder] = 0.8 * background[occluder] + 0.2 * 128.0
        images.append(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
        boxes, ratios = _visible_boxes(masks + ([occluder] if occluder is not None else []))
        boxes, ratios = boxes[:n], ratios[:n]
        keep = ratios >= MIN_VISIBLE
        rec = {"frame": out_index, "boxes": boxes[keep].astype(np.float32),
               "labels": np.array([s.label for s in shapes_t], np.int64)[keep],
               "ids": np.arange(n, dtype=np.int64)[keep], "visibility": ratios[keep]}
        if scene == "dropped":
            rec["source_frame"] = int(t)
        truth.append(rec)
    return images, truth


def clip_json(truth: list[dict], *, fps: float, size: tuple[int, int]) -> dict:
    """``make_clip``'s ground truth as the JSON document ``examples/clip.json`` holds (and
    ``ddetr eval --track`` reads): {"fps", "width", "height", "class_names", "frames": [{"frame",
    "boxes" (int xyxy px), "labels", "ids"}, ...]}."""
    return {"fps": fps, "width": size[0], "height": size[1], "class_names": CLASS_NAMES,
            "frames": [{"frame": f["frame"], "boxes": f["boxes"].astype(int).tolist(),
                        "labels": f["labels"].tolist(), "ids": f["ids"].tolist()} for f in truth]}


# --------------------------------------------------------------------------- examples + CLI

_EXAMPLE_SIZES = [(320, 240), (640, 480), (480, 640), (640, 360), (416, 416), (800, 600)]


def make_examples(root: Path, *, seed: int = 0) -> dict:
    """Regenerate the examples folder under `root`.

    Writes ``images/`` (six scenes of several sizes, with ``images/boxes.json``),
    ``clip.mp4`` (3 s, 320x240, 15 fps) with ``clip.json`` (its per-frame ground truth) and
    ``data/{coco,yolo,voc}`` (16 train + 8 val images at 320x240, the same in every format).
    """
    root = Path(root)
    for sub in ("images", "data", "clip.mp4", "clip.json"):
        p = root / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    truth_images = {}
    for i, (w, h) in enumerate(_EXAMPLE_SIZES):
        rng = np.random.default_rng([seed, 100, i])
        image, boxes, labels = render_scene(rng, w, h)
        name = f"shapes_{i}_{w}x{h}.jpg"
        _write(root / "images" / name, _encode_jpeg(image))
        truth_images[name] = {"boxes": boxes.astype(int).tolist(),
                              "labels": [CLASS_NAMES[k] for k in labels]}
    _write(root / "images" / "boxes.json", json.dumps(truth_images, indent=1) + "\n")
    clip = make_clip(root / "clip.mp4", frames=45, size=(320, 240), fps=15, seed=seed)
    _write(root / "clip.json", json.dumps(clip_json(clip, fps=15, size=(320, 240))) + "\n")
    summary = generate(root / "data", n_train=16, n_val=8, size=(320, 240), seed=seed)
    return {"images": len(_EXAMPLE_SIZES), "clip_frames": len(clip), "data": summary}


def main(argv: list[str] | None = None) -> None:
    """`python -m ddetr_cli.data.synth examples [--out DIR]` or `... dataset OUT --train N --val N`."""
    parser = argparse.ArgumentParser(prog="python -m ddetr_cli.data.synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("examples", help="regenerate the repository's examples/ folder")
    ex.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "examples")
    ex.add_argument("--seed", type=int, default=0)
    ds = sub.add_parser("dataset", help="write a synthetic dataset in COCO, YOLO and VOC")
    ds.add_argument("out", type=Path)
    ds.add_argument("--train", type=int, default=200)
    ds.add_argument("--val", type=int, default=50)
    ds.add_argument("--test", type=int, default=0)
    ds.add_argument("--width", type=int, default=320)
    ds.add_argument("--height", type=int, default=240)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--formats", default="coco,yolo,voc", help="comma-separated")
    pan = sub.add_parser("panoptic", help="write a synthetic COCO panoptic dataset (shapes over sky and ground)")
    pan.add_argument("out", type=Path)
    pan.add_argument("--train", type=int, default=200)
    pan.add_argument("--val", type=int, default=50)
    pan.add_argument("--width", type=int, default=320)
    pan.add_argument("--height", type=int, default=240)
    pan.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "examples":
        summary = make_examples(args.out, seed=args.seed)
    elif args.command == "panoptic":
        summary = generate_panoptic(args.out, n_train=args.train, n_val=args.val, size=(args.width, args.height),
                                    seed=args.seed)
    else:
        summary = generate(args.out, n_train=args.train, n_val=args.val, n_test=args.test,
                           size=(args.width, args.height), seed=args.seed,
                           formats=[f.strip() for f in args.formats.split(",") if f.strip()])
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""COCO panoptic format: one PNG per image whose colour is the segment id
(``id = R + 256 * G + 256**2 * B``, 0 = no segment) and one JSON file (``images``,
``annotations`` with ``file_name`` of the PNG and ``segments_info``, ``categories`` with
``isthing``), as panopticapi and detectron2 read it.

``Panoptic`` is the neutral result (a segment map and its segments) that ``engine.panoptic``
produces and ``PanopticWriter`` writes (``ddetr detect --panoptic``, ``video --panoptic``,
``eval --panoptic``); ``read_panoptic`` reads a dataset split for ``eval --panoptic``.

Layout read (COCO's, with or without the year): ``annotations/panoptic_<split>.json``, its PNGs
in ``annotations/panoptic_<split>/`` or ``panoptic_<split>/``, images in ``<split>/``,
``images/<split>/`` or ``images/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ddetr_cli.files import atomic_path, atomic_write_text
from ddetr_cli.formats.annotations import DatasetError, canonical_split, positive_int
from ddetr_cli.formats.labels import LabelTable

PANOPTIC_JSON = "panoptic.json"


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids (< 256**3) -> (H, W, 3) uint8 RGB."""
    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) int64 segment ids."""
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_segment_png(path: Path) -> np.ndarray:
    """A panoptic PNG -> (H, W) int64 segment ids."""
    try:
        with Image.open(path) as im:
            return rgb_to_id(np.asarray(im.convert("RGB")))
    except OSError as e:
        raise DatasetError(f"cannot read panoptic PNG {path} ({e})") from None


def write_segment_png(path: Path, segmap: np.ndarray) -> None:
    """(H, W) segment ids -> RGB PNG at ``path``, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(id_to_rgb(segmap), "RGB").save(tmp, format="PNG")


@dataclass
class Segment:
    """One segment of a ``Panoptic``: its id in the map, the model label, its score (None for
    ground truth)."""

    id: int
    label: int
    score: float | None = None


@dataclass
class Panoptic:
    """One image's panoptic result: ``segmap`` (H, W) int32 segment ids (0 = no segment) and the
    segments, one per id."""

    segmap: np.ndarray
    segments: list[Segment] = field(default_factory=list)


def segment_stats(segmap: np.ndarray, ids: Sequence[int]) -> dict[int, tuple[int, list[int]]]:
    """id -> (area in pixels, bbox [x, y, w, h] of its pixels; [0, 0, 0, 0] when absent)."""
    out: dict[int, tuple[int, list[int]]] = {}
    for i in ids:
        m = segmap == i
        area = int(np.count_nonzero(m))
        if not area:
            out[int(i)] = (0, [0, 0, 0, 0])
            continue
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        out[int(i)] = (area, [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)])
    return out


def segments_info(result: Panoptic, labels: LabelTable) -> tuple[np.ndarray, list[dict]]:
    """A result -> (the map to write, its ``segments_info``: id, category_id, isthing, area,
    bbox [x, y, w, h], iscrowd 0, score). Segments whose label has no category (unnamed slots)
    or no pixels are left out, and their pixels become 0 (no segment)."""
    segmap = np.asarray(result.segmap)
    keep = [s for s in result.segments if labels.get(s.label) is not None]
    stats = segment_stats(segmap, [s.id for s in keep])
    keep = [s for s in keep if stats[s.id][0] > 0]
    dropped = {int(i) for i in np.unique(segmap) if i} - {s.id for s in keep}
    if dropped:
        segmap = np.where(np.isin(segmap, sorted(dropped)), 0, segmap)
    info = []
    for s in keep:
        cat = labels.get(s.label)
        area, bbox = stats[s.id]
        row = {"id": int(s.id), "category_id": cat.id, "isthing": int(cat.isthing), "area": area, "bbox": bbox,
               "iscrowd": 0}
        if s.score is not None:
            row["score"] = round(float(s.score), 5)
        info.append(row)
    return segmap, info


class PanopticWriter:
    """Writes each image's PNG into ``png_dir`` as it is added; ``write`` dumps the JSON (valid
    at any time) atomically."""

    def __init__(self, labels: LabelTable, png_dir: Path) -> None:
        self.labels = labels
        self.png_dir = Path(png_dir)
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, file_name: str, width: int, height: int, result: Panoptic, image_id: int | None = None,
            png_name: str | None = None, source: str | None = None) -> dict:
        """One image: its PNG (``png_name``, default ``<stem of file_name>.png``) and records;
        returns the annotation record."""
        image_id = len(self.images) + 1 if image_id is None else int(image_id)
        png = png_name or Path(file_name).with_suffix(".png").as_posix()
        segmap, info = segments_info(result, self.labels)
        if segmap.shape != (height, width):
            raise ValueError(f"segment map {segmap.shape} for a {height}x{width} image")
        write_segment_png(self.png_dir / png, segmap)
        record = {"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)}
        if source is not None:
            record["ddetr_source"] = source
        self.images.append(record)
        ann = {"image_id": image_id, "file_name": png, "segments_info": info}
        self.annotations.append(ann)
        return ann

    def to_dict(self, info: dict[str, Any] | None = None) -> dict:
        return {"info": info or {}, "licenses": [], "images": self.images, "annotations": self.annotations,
                "categories": self.labels.panoptic_categories()}

    def write(self, path: Path, info: dict[str, Any] | None = None) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(info)))


# --------------------------------------------------------------------------- reading


@dataclass
class PanopticImage:
    """One image of a panoptic split: the image file, its PNG and its ``segments_info``."""

    path: Path
    image_id: int
    width: int | None
    height: int | None
    png: Path
    segments: list[dict]


@dataclass
class PanopticSplit:
    """A panoptic dataset split: ``json_path`` and ``png_dir`` (as written), ``categories``
    (the file's, with ``isthing``) and the images."""

    root: Path
    split: str
    json_path: Path
    png_dir: Path
    categories: list[dict]
    images: list[PanopticImage]

    @property
    def labels(self) -> LabelTable:
        """The categories as a label table (label = position in id order), stuff flagged."""
        names = [c["name"] for c in self.categories]
        ids = [int(c["id"]) for c in self.categories]
        stuff = [int(c["id"]) for c in self.categories if not c.get("isthing", 1)]
        return LabelTable.from_names(names, ids, stuff_ids=stuff)


def panoptic_splits(root: Path) -> dict[str, Path]:
    """split -> ``annotations/panoptic_<split>[year].json`` of a COCO panoptic dataset."""
    ann = Path(root) / "annotations"
    splits: dict[str, Path] = {}
    if ann.is_dir():
        for f in sorted(ann.glob("panoptic_*.json")):
            name = f.stem[len("panoptic_"):].rstrip("0123456789") or f.stem
            splits.setdefault(canonical_split(name), f)
    return splits


def _first_dir(cands: Sequence[Path], default: Path) -> Path:
    return next((c for c in cands if c.is_dir()), default)


def read_panoptic(root: Path, split: str = "val") -> PanopticSplit:
    """One split of a COCO panoptic dataset (see the module docstring for the layout)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    splits = panoptic_splits(root)
    want = canonical_split(split)
    if want not in splits:
        have = ", ".join(splits) or "none"
        raise DatasetError(f"{root}: no panoptic split {split!r} (expected annotations/panoptic_<split>.json; found: {have})")
    json_path = splits[want]
    stem = json_path.stem  # panoptic_val2017
    png_dir = _first_dir([json_path.parent / stem, root / stem], json_path.parent / stem)
    bare = stem[len("panoptic_"):]
    image_dir = _first_dir([root / bare, root / "images" / bare, root / bare.rstrip("0123456789"),
                            root / "images" / bare.rstrip("0123456789"), root / "images"], root)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{json_path}: cannot read ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or not data.get("categories"):
        raise DatasetError(f"{json_path}: not a COCO panoptic file (needs 'annotations' and 'categories')")
    cats = sorted((c for c in data["categories"] if isinstance(c, dict) and "id" in c), key=lambda c: int(c["id"]))
    by_id = {}
    for im in data.get("images") or []:
        try:
            by_id[int(im["id"])] = im
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{json_path}: every image needs an 'id'") from None
    images = []
    for a in data["annotations"]:
        try:
            image_id, png = int(a["image_id"]), str(a["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{json_path}: every annotation needs an 'image_id' and a 'file_name'") from None
        im = by_id.get(image_id)
        if im is None:
            raise DatasetError(f"{json_path}: annotation of image {image_id}, which 'images' does not list")
        images.append(PanopticImage(path=image_dir / str(im.get("file_name", "")), image_id=image_id,
                                    width=positive_int(im.get("width")), height=positive_int(im.get("height")),
                                    png=png_dir / png, segments=list(a.get("segments_info") or [])))
    if not images:
        raise DatasetError(f"{json_path}: no annotated images")
    return PanopticSplit(root=root, split=want, json_path=json_path, png_dir=png_dir, categories=cats, images=images)

"""Read a detection dataset in COCO, YOLO or Pascal VOC layout into one in-memory form.

Layouts understood:

- COCO, roboflow style: ``<split>/_annotations.coco.json`` with the images beside it
  (``train/``, ``valid/`` or ``val/``, ``test/``); classic style:
  ``annotations/instances_<split>[2017].json`` with images in ``<split>[2017]/``,
  ``images/<split>[2017]/`` or ``images/``.
- YOLO: ``data.yaml`` (or ``dataset.yaml``) whose ``train``/``val``/``test`` name image folders
  (or ``.txt`` lists); labels are found by swapping the last ``images`` folder for ``labels``.
  The roboflow variant ``<split>/images`` + ``<split>/labels`` works too; ``names`` may be a list
  or a dict ``{id: name}``.
- Pascal VOC: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``; the class
  order comes from ``labels.txt``/``classes.txt``/``labelmap.txt`` when present, else the sorted
  object names. Boxes follow the devkit convention (``xmin``/``ymin`` 1-based, ``xmax``/``ymax``
  the last pixel), so ``x1 = xmin - 1`` and ``x2 = xmax``.

Every box comes out as absolute ``xyxy`` pixels (pixel-edge convention, ``0 <= x1 < x2 <= W``)
with a contiguous 0-based label. Instance masks are kept as COCO segmentations beside the boxes
(``Record.segments``): COCO polygons and RLE as written, YOLO segmentation lines as absolute
polygons. Problems that can be repaired are repaired and counted in a ``Report``; fatal ones raise
``DatasetError`` with one line naming the file.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ddetr_cli.formats.labels import LabelTable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FORMATS = ("coco", "yolo", "voc")
_FORMAT_ALIASES = {"coco": "coco", "yolo": "yolo", "voc": "voc", "pascal_voc": "voc",
                   "pascal-voc": "voc", "pascalvoc": "voc"}
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}
_YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")
_VOC_CLASS_FILES = ("labels.txt", "classes.txt", "labelmap.txt")
_ROBOFLOW_JSON = "_annotations.coco.json"
_SHOW = 5  # how many file names a message lists


class DatasetError(ValueError):
    """A dataset that cannot be used; the message is one line naming the file at fault."""


def canonical_split(name: str) -> str:
    """'valid'/'validation' -> 'val', 'training' -> 'train', ...; other names unchanged."""
    return _SPLIT_ALIASES.get(name.lower(), name)


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
        return LabelTable.from_names(self.class_names, ids)

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


@dataclass
class _Entry:
    """An image as listed by the annotations, before files are checked.

    boxes: (K, 4) xyxy, absolute pixels or (when `normalized`) fractions of the image size.
    keys: (K,) category keys (COCO/YOLO id or VOC name).
    segments: (K,) COCO segmentations ([] = none), scaled like the boxes.
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
class _Source:
    """A parsed split: class list, mapping from category key to label, listed images."""

    class_names: list[str]
    category_ids: list[int]
    key_to_label: dict[Any, int]
    entries: list[_Entry]
    notes: list[str] = field(default_factory=list)


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


def _positive_int(value: Any) -> int | None:
    try:
        v = int(float(value))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and p.is_file())


def _build(entries: list[_Entry], key_to_label: dict[Any, int], report: Report) -> list[Record]:
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


# --------------------------------------------------------------------------- COCO


def coco_splits(root: Path) -> dict[str, Path]:
    """split -> annotation JSON, for the roboflow and the classic layout."""
    splits: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / _ROBOFLOW_JSON).is_file():
            splits.setdefault(canonical_split(d.name), d / _ROBOFLOW_JSON)
    ann = root / "annotations"
    if ann.is_dir():
        for f in sorted(ann.glob("instances_*.json")):
            name = f.stem[len("instances_"):].rstrip("0123456789") or f.stem
            splits.setdefault(canonical_split(name), f)
    return splits


def _coco_image_dir(root: Path, ann_file: Path) -> Path:
    """Folder that file_name is relative to."""
    if ann_file.name == _ROBOFLOW_JSON:
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


def _read_coco(root: Path, ann_file: Path) -> _Source:
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
    image_dir = _coco_image_dir(root, ann_file)
    entries: dict[int, _Entry] = {}
    for img in data["images"]:
        try:
            image_id, file_name = int(img["id"]), str(img["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{ann_file}: every image needs an 'id' and a 'file_name'") from None
        if image_id in entries:
            raise DatasetError(f"{ann_file}: image id {image_id} is used twice")
        entries[image_id] = _Entry(path=image_dir / file_name, image_id=image_id,
                                   width=_positive_int(img.get("width")),
                                   height=_positive_int(img.get("height")))
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
    return _Source(class_names=[c["name"] for c in cats], category_ids=[int(c["id"]) for c in cats],
                   key_to_label=key_to_label, entries=list(entries.values()), notes=notes)


# --------------------------------------------------------------------------- YOLO


def _yolo_yaml(root: Path) -> Path | None:
    return next((root / n for n in _YAML_NAMES if (root / n).is_file()), None)


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"{path}: not valid YAML ({reason})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with 'names' and 'train'/'val' keys")
    return data


def _yolo_names(yaml_file: Path, data: dict) -> tuple[list[str], list[int]]:
    """Class names and their YOLO ids, from `names` (list or dict) or `nc`."""
    names = data.get("names")
    if isinstance(names, list):
        return [str(n) for n in names], list(range(len(names)))
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_file}: 'names' keys must be class ids (0, 1, ...)") from None
        lookup = {int(k): str(v) for k, v in names.items()}
        return [lookup[i] for i in ids], ids
    nc = _positive_int(data.get("nc"))
    if nc:
        return [str(i) for i in range(nc)], list(range(nc))
    raise DatasetError(f"{yaml_file}: no class 'names' (a list or a dict of id: name)")


def _yolo_splits(root: Path) -> dict[str, list[Path]]:
    """split -> image folders or .txt image lists."""
    yaml_file = _yolo_yaml(root)
    data = _load_yaml(yaml_file) if yaml_file else {}
    base = root
    if isinstance(data.get("path"), str) and data["path"].strip():
        p = Path(data["path"])
        p = p if p.is_absolute() else root / p
        base = p if p.is_dir() else root
    splits: dict[str, list[Path]] = {}
    for key in ("train", "val", "valid", "test"):
        value = data.get(key)
        values = value if isinstance(value, list) else [value] if value else []
        found = []
        for v in values:
            v = str(v)
            rel = Path(v.lstrip("./")) if v.startswith("../") else Path(v)
            for cand in (base / v, root / v, root / rel):  # roboflow writes '../train/images'
                if cand.exists():
                    found.append(cand)
                    break
        if found:
            splits.setdefault(canonical_split(key), found)
    # Conventional folders, also when data.yaml's paths point elsewhere.
    for d in sorted(p for p in (root / "images").glob("*") if p.is_dir()):
        splits.setdefault(canonical_split(d.name), [d])
    for d in sorted(p for p in root.iterdir() if (p / "images").is_dir()):
        splits.setdefault(canonical_split(d.name), [d / "images"])
    return splits


def _yolo_label_path(image: Path) -> Path:
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _parse_yolo_label(path: Path, entry: _Entry) -> None:
    """Append boxes from one label file: 'class cx cy w h' or 'class x1 y1 x2 y2 ...' (polygon)."""
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts]
        except ValueError:
            entry.invalid += 1
            continue
        if not all(math.isfinite(v) for v in values):  # nan/inf would poison training, not be skipped
            raise DatasetError(f"{path}:{lineno}: non-finite number in label line {line.strip()!r}")
        cls = values[0]
        seg: list = []
        if len(values) == 5:
            cx, cy, w, h = values[1:]
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif len(values) >= 7 and len(values) % 2 == 1:
            xs, ys = values[1::2], values[2::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
            seg = [values[1:]]  # normalised; scaled to pixels with the box
        else:
            entry.invalid += 1
            continue
        entry.boxes.append(box)
        entry.segments.append(seg)
        entry.keys.append(int(cls) if cls == int(cls) else cls)


def _read_yolo(root: Path, sources: list[Path]) -> _Source:
    yaml_file = _yolo_yaml(root)
    if yaml_file is None:
        raise DatasetError(f"{root}: no {' or '.join(_YAML_NAMES[:2])} with the class names")
    names, ids = _yolo_names(yaml_file, _load_yaml(yaml_file))
    images: list[Path] = []
    for src in sources:
        if src.is_dir():
            images += _list_images(src)
        else:  # a .txt list of image paths, relative to its own folder
            for line in src.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    p = Path(line.strip())
                    images.append(p if p.is_absolute() else src.parent / p)
    entries, no_label = [], 0
    for i, img in enumerate(images, start=1):
        e = _Entry(path=img, image_id=i, width=None, height=None, normalized=True)
        label = _yolo_label_path(img)
        if label.is_file():
            _parse_yolo_label(label, e)
        else:
            no_label += 1
        entries.append(e)
    notes = [f"{no_label} images have no label file (read as background)"] if no_label else []
    return _Source(class_names=names, category_ids=ids,
                   key_to_label={k: i for i, k in enumerate(ids)}, entries=entries, notes=notes)


# --------------------------------------------------------------------------- Pascal VOC


def _voc_splits(root: Path) -> dict[str, list[str] | None]:
    """split -> image ids (None: every file in Annotations/, when there are no ImageSets)."""
    main = root / "ImageSets" / "Main"
    files = sorted(p for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []
    if not files:
        return {"train": None}
    splits: dict[str, list[str] | None] = {}
    for f in files:
        ids = [line.split()[0] for line in f.read_text(encoding="utf-8").splitlines()
               if line.strip()]
        splits.setdefault(canonical_split(f.stem), ids)
    return splits


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{path}: not valid XML ({e})") from None


def _voc_class_names(root: Path) -> list[str] | None:
    """Class order from labels.txt / classes.txt / CVAT's labelmap.txt, if one exists."""
    for name in _VOC_CLASS_FILES:
        f = root / name
        if f.is_file():
            out = []
            for line in f.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line.split(":")[0] if name == "labelmap.txt" else line)
            return [n for n in out if n != "background"]
    return None


def _voc_image(root: Path, xml: ET.Element, image_id: str) -> Path:
    folder = root / "JPEGImages"
    name = (xml.findtext("filename") or "").strip()
    if name and (folder / name).is_file():
        return folder / name
    for ext in IMAGE_EXTENSIONS:
        if (folder / (image_id + ext)).is_file():
            return folder / (image_id + ext)
    return folder / (name or image_id + ".jpg")


def _read_voc(root: Path, ids: list[str] | None) -> _Source:
    ann_dir = root / "Annotations"
    if ids is None:
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
    names = _voc_class_names(root)
    notes = []
    if names is None:
        found = {(o.findtext("name") or "").strip() for f in sorted(ann_dir.glob("*.xml"))
                 for o in _parse_xml(f).iter("object")}
        names = sorted(n for n in found if n)
        notes.append("class order: sorted object names (no labels.txt)")
    entries, difficult = [], 0
    for i, image_id in enumerate(ids, start=1):
        xml_file = ann_dir / f"{image_id}.xml"
        if not xml_file.is_file():  # an entry whose path cannot exist: counted as missing
            entries.append(_Entry(path=xml_file, image_id=i, width=None, height=None))
            continue
        xml = _parse_xml(xml_file)
        size = xml.find("size")
        e = _Entry(path=_voc_image(root, xml, image_id), image_id=i,
                   width=_positive_int(size.findtext("width")) if size is not None else None,
                   height=_positive_int(size.findtext("height")) if size is not None else None)
        for obj in xml.iter("object"):
            bb = obj.find("bndbox")
            try:
                xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in
                                          ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                e.invalid += 1
                continue
            if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
                raise DatasetError(f"{xml_file}: object {(obj.findtext('name') or '').strip()!r} has a "
                                   "non-finite bndbox")
            difficult += (obj.findtext("difficult") or "0").strip() == "1"
            e.boxes.append([xmin - 1, ymin - 1, xmax, ymax])
            e.keys.append((obj.findtext("name") or "").strip())
        entries.append(e)
    if difficult:
        notes.append(f"kept {difficult} boxes marked difficult")
    return _Source(class_names=names, category_ids=list(range(len(names))),
                   key_to_label={n: i for i, n in enumerate(names)}, entries=entries, notes=notes)


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
    if _yolo_yaml(root):
        return "yolo"
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / _ROBOFLOW_JSON).is_file():
        raise DatasetError(f"{root} holds one COCO split; give its parent folder (the dataset root)")
    raise DatasetError(
        f"{root}: unknown dataset format; expected COCO (train/{_ROBOFLOW_JSON} or "
        "annotations/instances_train.json), YOLO (data.yaml with images/ and labels/) "
        "or Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/)")


def _split_table(root: Path, fmt: str) -> dict[str, Any]:
    if fmt == "coco":
        return coco_splits(root)
    if fmt == "yolo":
        return _yolo_splits(root)
    return _voc_splits(root)


def _read(root: Path, fmt: str, locator: Any) -> _Source:
    reader = {"coco": _read_coco, "yolo": _read_yolo, "voc": _read_voc}[fmt]
    return reader(root, locator)


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
    splits = _split_table(root, fmt)
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
    source = _read(root, fmt, locator)
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
                   category_ids=source.category_ids, records=records, report=report)

"""YOLO: reading a dataset's ``data.yaml`` and label files, writing label lines and ``data.yaml``.

Read: ``data.yaml`` (or ``dataset.yaml``) whose ``train``/``val``/``test`` name image folders
(or ``.txt`` lists); labels are found by swapping the last ``images`` folder for ``labels``.
The roboflow variant ``<split>/images`` + ``<split>/labels`` works too; ``names`` may be a list
or a dict ``{id: name}``. A label line is ``class cx cy w h`` or a segmentation polygon
``class x1 y1 x2 y2 ...``, normalised to the image size.

Written: the class is the category's contiguous 0-based index (``Category.yolo``), with the
names in ``data.yaml`` and ``classes.txt`` (``annotations.names_txt``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ddetr_cli.formats.annotations import DatasetError, Entry, Instances, Source, canonical_split, list_images, positive_int
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.masks import join_polygons

YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")


# --------------------------------------------------------------------------- reading


def yolo_yaml(root: Path) -> Path | None:
    """The dataset YAML of a YOLO dataset folder, if it has one."""
    return next((root / n for n in YAML_NAMES if (root / n).is_file()), None)


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


def _names(yaml_file: Path, data: dict) -> tuple[list[str], list[int]]:
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
    nc = positive_int(data.get("nc"))
    if nc:
        return [str(i) for i in range(nc)], list(range(nc))
    raise DatasetError(f"{yaml_file}: no class 'names' (a list or a dict of id: name)")


def yolo_splits(root: Path) -> dict[str, list[Path]]:
    """split -> image folders or .txt image lists."""
    yaml_file = yolo_yaml(root)
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


def label_path(image: Path) -> Path:
    """The label file of an image: its last ``images`` folder swapped for ``labels``, ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _parse_label(path: Path, entry: Entry) -> None:
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


def read_yolo(root: Path, sources: list[Path]) -> Source:
    """One split: its image folders / image lists ``sources`` (from ``yolo_splits``)."""
    yaml_file = yolo_yaml(root)
    if yaml_file is None:
        raise DatasetError(f"{root}: no {' or '.join(YAML_NAMES[:2])} with the class names")
    names, ids = _names(yaml_file, _load_yaml(yaml_file))
    images: list[Path] = []
    for src in sources:
        if src.is_dir():
            images += list_images(src)
        else:  # a .txt list of image paths, relative to its own folder
            for line in src.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    p = Path(line.strip())
                    images.append(p if p.is_absolute() else src.parent / p)
    entries, no_label = [], 0
    for i, img in enumerate(images, start=1):
        e = Entry(path=img, image_id=i, width=None, height=None, normalized=True)
        label = label_path(img)
        if label.is_file():
            _parse_label(label, e)
        else:
            no_label += 1
        entries.append(e)
    notes = [f"{no_label} images have no label file (read as background)"] if no_label else []
    return Source(class_names=names, category_ids=ids,
                  key_to_label={k: i for i, k in enumerate(ids)}, entries=entries, notes=notes)


# --------------------------------------------------------------------------- writing


def yolo_lines(instances: Instances, width: int, height: int, labels: LabelTable, save_conf: bool = False) -> str:
    """The label file of one image: ``class cx cy w h`` normalised (6 decimals), class = the
    category's YOLO index; instances in unnamed slots are left out. Coordinates are computed in
    float32, the detector's precision, so a box writes the same line as ground truth or as a
    prediction.

    With polygons: YOLO segmentation lines ``class x1 y1 x2 y2 ...`` normalised, one ring per
    instance (parts joined by zero-width cuts, since the format has one polygon per line); an
    instance without a mask is written as its box's corners, so every line is a polygon.

    ``save_conf``: the score as a last column (ultralytics' ``save_conf``), with the 5 decimals
    of ``score`` in COCO files.
    """
    boxes = np.asarray(instances.boxes, np.float32)
    polygons, scores = instances.polygons, instances.scores
    if save_conf and scores is None:
        raise ValueError("save_conf needs scores")
    rows = []
    for i, ((x1, y1, x2, y2), label) in enumerate(zip(boxes, instances.labels)):
        cat = labels.get(int(label))
        if cat is None:
            continue
        conf = f" {float(scores[i]):.5f}" if save_conf else ""
        if polygons is not None:
            ring = join_polygons(polygons[i]) or [x1, y1, x2, y1, x2, y2, x1, y2]
            xy = " ".join(f"{v / (width if k % 2 == 0 else height):.6f}" for k, v in enumerate(ring))
            rows.append(f"{cat.yolo} {xy}{conf}")
            continue
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        w, h = (x2 - x1) / width, (y2 - y1) / height
        rows.append(f"{cat.yolo} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}{conf}")
    return "\n".join(rows) + ("\n" if rows else "")


def _yaml_item(key: str, value: object) -> str:
    """One top-level ``key: value`` of a YAML mapping as PyYAML writes it (quoted as needed);
    ``None`` as a bare ``key:``."""
    import yaml

    if value is None:
        return f"{key}:\n"
    return yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True)


def yolo_data_yaml(labels: LabelTable, splits: Mapping[str, str | None], *, path: Path | None = None,
                   comments: Sequence[str] = (), names_list: bool = False) -> str:
    """The dataset YAML read by ultralytics (and supervision's ``from_yolo``, Datumaro's
    ``yolo_ultralytics``, ``read_yolo``): ``comments`` as ``#`` lines, ``path`` when given,
    ``splits`` (split -> image folder, relative to ``path`` or else to the YAML's own folder;
    None for an empty entry), ``nc`` and ``names`` in YOLO index order (``{index: name}``, or a
    list with ``names_list``)."""
    parts = [f"# {c}\n" for c in comments]
    if path is not None:
        parts.append(_yaml_item("path", str(path)))
    parts += [_yaml_item(k, v) for k, v in splits.items()]
    parts.append(_yaml_item("nc", len(labels)))
    if names_list:
        import yaml

        items = yaml.safe_dump(labels.names, allow_unicode=True).splitlines(keepends=True) if len(labels) else []
        parts.append("names:\n" + "".join("  " + line for line in items) if items else "names: []\n")
    else:
        parts.append(_yaml_item("names", {c.yolo: c.name for c in labels}))
    return "".join(parts)

"""Pascal VOC: reading ``Annotations/*.xml`` (with ``ImageSets/Main/<split>.txt``), writing them.

Read: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``; the class order
comes from ``labels.txt``/``classes.txt``/``labelmap.txt`` when present, else the sorted object
names. Boxes follow the devkit convention (``xmin``/``ymin`` 1-based, ``xmax``/``ymax`` the last
pixel), so ``x1 = xmin - 1`` and ``x2 = xmax``.

Written: the same convention, ``<name>`` = the category name, ``<confidence>`` for predictions;
``labelmap.txt`` (Datumaro, so CVAT) or ``labels.txt`` (``annotations.names_txt``) for the class
order, ``ImageSets/Main/<split>.txt`` for the image list.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from xml.sax.saxutils import escape

from ddetr_cli.formats.annotations import IMAGE_EXTENSIONS, DatasetError, Entry, Instances, Source, canonical_split, positive_int
from ddetr_cli.formats.labels import LabelTable

CLASS_FILES = ("labels.txt", "classes.txt", "labelmap.txt")


# --------------------------------------------------------------------------- reading


def is_voc(root: Path) -> bool:
    return (root / "Annotations").is_dir()


def voc_splits(root: Path) -> dict[str, list[str] | None]:
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


def _class_names(root: Path) -> list[str] | None:
    """Class order from labels.txt / classes.txt / CVAT's labelmap.txt, if one exists."""
    for name in CLASS_FILES:
        f = root / name
        if f.is_file():
            out = []
            for line in f.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line.split(":")[0] if name == "labelmap.txt" else line)
            return [n for n in out if n != "background"]
    return None


def _image(root: Path, xml: ET.Element, image_id: str) -> Path:
    folder = root / "JPEGImages"
    name = (xml.findtext("filename") or "").strip()
    if name and (folder / name).is_file():
        return folder / name
    for ext in IMAGE_EXTENSIONS:
        if (folder / (image_id + ext)).is_file():
            return folder / (image_id + ext)
    return folder / (name or image_id + ".jpg")


def read_voc(root: Path, ids: list[str] | None) -> Source:
    """One split: the image ids ``ids`` (from ``voc_splits``; None = every annotation file)."""
    ann_dir = root / "Annotations"
    if ids is None:
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
    names = _class_names(root)
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
            entries.append(Entry(path=xml_file, image_id=i, width=None, height=None))
            continue
        xml = _parse_xml(xml_file)
        size = xml.find("size")
        e = Entry(path=_image(root, xml, image_id), image_id=i,
                  width=positive_int(size.findtext("width")) if size is not None else None,
                  height=positive_int(size.findtext("height")) if size is not None else None)
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
    return Source(class_names=names, category_ids=list(range(len(names))),
                  key_to_label={n: i for i, n in enumerate(names)}, entries=entries, notes=notes)


# --------------------------------------------------------------------------- writing


def voc_xml(file_name: str, width: int, height: int, instances: Instances, labels: LabelTable,
            database: str | None = None) -> str:
    """The annotation of one image, indented by two spaces: ``<name>`` = the category name;
    pixel coordinates 1-based inclusive as in the devkit (boxes rounded to whole pixels, at least
    one pixel wide); ``<confidence>`` (5 decimals) when the instances have scores;
    ``<source><database>`` when ``database`` is given. Instances in unnamed slots are left out."""
    out = ["<annotation>", "  <folder>JPEGImages</folder>", f"  <filename>{escape(file_name)}</filename>"]
    if database is not None:
        out.append(f"  <source><database>{escape(database)}</database></source>")
    out += ["  <size>", f"    <width>{width}</width>", f"    <height>{height}</height>", "    <depth>3</depth>",
            "  </size>", "  <segmented>0</segmented>"]
    scores = instances.scores
    for i, ((x1, y1, x2, y2), label) in enumerate(zip(instances.boxes, instances.labels)):
        cat = labels.get(int(label))
        if cat is None:
            continue
        out += ["  <object>", f"    <name>{escape(cat.name)}</name>", "    <pose>Unspecified</pose>",
                "    <truncated>0</truncated>", "    <difficult>0</difficult>"]
        if scores is not None:
            out.append(f"    <confidence>{float(scores[i]):.5f}</confidence>")
        xmin, ymin = int(round(x1)) + 1, int(round(y1)) + 1
        out += ["    <bndbox>", f"      <xmin>{xmin}</xmin>", f"      <ymin>{ymin}</ymin>",
                f"      <xmax>{max(int(round(x2)), xmin)}</xmax>", f"      <ymax>{max(int(round(y2)), ymin)}</ymax>",
                "    </bndbox>", "  </object>"]
    return "\n".join(out) + "\n</annotation>\n"


def voc_labelmap(labels: LabelTable) -> str:
    """``labelmap.txt`` of a Pascal VOC folder as Datumaro (and so CVAT) reads it: the header
    ``# label:color_rgb:parts:actions`` and one ``name:::`` line per category, in label order
    (without it the 20 VOC classes are assumed and other names are rejected)."""
    for n in labels.names:
        if ":" in n:
            raise ValueError(f"class name {n!r} has a ':', which labelmap.txt cannot hold")
    return "# label:color_rgb:parts:actions\n" + "".join(f"{n}:::\n" for n in labels.names)


def voc_image_set(stems: Iterable[str]) -> str:
    """``ImageSets/Main/<split>.txt``: the image ids (file stems), one per line."""
    return "".join(f"{s}\n" for s in stems)

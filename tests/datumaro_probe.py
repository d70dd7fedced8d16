"""Run by tests/test_roundtrip.py with the Python of the Datumaro virtualenv (Datumaro pins
opencv < 5 and pillow 12, so it does not live in the project's environment).

    python datumaro_probe.py RUN_FOLDER  ->  JSON on stdout:
    {"coco_instances" | "yolo" | "voc_detection": {"labels": [...], "items": {id: [[name, x, y, w, h, score], ...]}}}

Each format is imported from the folder ``ddetr detect`` wrote, as it is, with Datumaro's own
importer (the one CVAT uses): coco_instances from the run folder (annotations/instances_*.json
+ images/), yolo from the run folder (data.yaml + labels/ + images/: its ultralytics layout),
voc_detection from voc/ with the devkit's 1-based coordinates.
"""

from __future__ import annotations

import json
import sys

import datumaro as dm
from datumaro.components.annotation import AnnotationType


def read(path: str, fmt: str, **kw) -> dict:
    ds = dm.Dataset.import_from(path, fmt, **kw)
    labels = [c.name for c in ds.categories()[AnnotationType.label]]
    items = {}
    for item in ds:
        items[item.id] = [
            [labels[a.label], *(float(v) for v in a.get_bbox()), a.attributes.get("score")]
            for a in item.annotations
            if a.type == AnnotationType.bbox
        ]
    return {"labels": labels, "items": items}


def main() -> None:
    run = sys.argv[1]
    out = {
        "version": dm.__version__,
        "coco_instances": read(run, "coco_instances"),
        "yolo": read(run, "yolo"),
        "voc_detection": read(f"{run}/voc", "voc_detection", coordinate_mode="voc-one-based"),
    }
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()

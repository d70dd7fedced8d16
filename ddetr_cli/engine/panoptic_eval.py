"""``ddetr eval DATA --panoptic``: panoptic quality of a mask-head model on a COCO panoptic split.

The model's panoptic results are written as COCO panoptic files (``panoptic/`` PNGs and
``panoptic.json``, with the dataset's image and category ids) and scored from those files by
``engine.pq``, so anyone can re-score them::

    split = read_panoptic(Path("data/panoptic"), "val")
    res = evaluate_panoptic(Detector.from_pretrained("my-model"), split, out_dir=Path("runs/eval/exp"))
    res.summary["All"]["pq"]

Model classes are matched to the dataset's categories as for box AP (``evaluator.match_tables``:
by id when the model carries the dataset's ids, else by name); the dataset's ``isthing`` flags
decide which classes merge into one segment per image.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddetr_cli.data.images import ImageReadError, read_image
from ddetr_cli.engine.evaluator import ClassMapping, EvalError, match_tables
from ddetr_cli.engine.panoptic import PANOPTIC_THRESHOLD
from ddetr_cli.engine.pq import PQError, pq_compute
from ddetr_cli.files import atomic_write_text
from ddetr_cli.formats.labels import Category, LabelTable
from ddetr_cli.formats.panoptic import PANOPTIC_JSON, PanopticSplit, PanopticWriter


@dataclass
class PanopticEvalResult:
    """``summary``: {"All", "Things", "Stuff"} -> {pq, sq, rq, n}; ``per_class`` rows (pq, sq,
    rq, tp, fp, fn). Values are fractions in [0, 1]."""

    summary: dict[str, dict[str, float]]
    per_class: list[dict]
    images: int
    mapping: ClassMapping
    seconds: float
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"panoptic": self.summary, "per_class": self.per_class, "images": self.images,
                "class_mapping": self.mapping.to_dict(), "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images / self.seconds, 3) if self.seconds > 0 else 0.0,
                "warnings": self.warnings, "skipped": self.skipped, "dataset": self.dataset,
                "settings": self.settings, "outputs": self.outputs}


def dataset_table(model: LabelTable, split: PanopticSplit, mapping: ClassMapping) -> LabelTable:
    """The model's matched labels under the dataset's category ids, names and isthing flags."""
    cats = {c.id: c for c in split.labels}
    return LabelTable([Category(label=label, id=cid, name=cats[cid].name, yolo=k, supercategory=cats[cid].supercategory,
                                isthing=cats[cid].isthing)
                       for k, (label, cid) in enumerate(sorted(mapping.label_to_cat.items()))], model.num_labels)


def evaluate_panoptic(
    detector: Any,
    split: PanopticSplit,
    *,
    out_dir: Path,
    batch: int = 1,
    max_images: int | None = None,
    threshold: float = PANOPTIC_THRESHOLD,
    progress: Callable[[int, int], None] | None = None,
) -> PanopticEvalResult:
    """Predict every image of ``split`` (the first ``max_images``), write the COCO panoptic
    files and ``metrics.json`` into ``out_dir`` and score them. Unreadable images are skipped and
    left out of the ground truth too. Raises EvalError when nothing can be scored."""
    if not getattr(detector.cfg, "masks", False):
        raise EvalError("--panoptic needs a model with a mask head")
    mapping = match_tables(detector.labels, split.labels, ids_comparable=True)
    if not mapping.label_to_cat:
        raise EvalError(f"none of the model's classes is in the dataset ({', '.join(c.name for c in split.labels)})")
    table = dataset_table(detector.labels, split, mapping)
    warnings = []
    if mapping.dataset_only:
        warnings.append(f"{len(mapping.dataset_only)} dataset categories are unknown to the model and count as misses: "
                        + ", ".join(mapping.dataset_only[:8]))
    images = split.images[:max_images] if max_images else list(split.images)
    out_dir = Path(out_dir)
    writer = PanopticWriter(table, out_dir / "panoptic")
    done, skipped, used = 0, [], []
    t0 = time.perf_counter()
    for start in range(0, len(images), max(1, batch)):
        chunk, arrays = [], []
        for im in images[start : start + max(1, batch)]:
            try:
                arrays.append(read_image(im.path))
                chunk.append(im)
            except (ImageReadError, OSError) as e:
                skipped.append(f"{im.path}: {e}")
        if arrays:
            sizes = [(im.height or a.shape[0], im.width or a.shape[1]) for im, a in zip(chunk, arrays)]
            results = detector.panoptic_arrays(arrays, threshold, classes=table.labels, stuff_labels=table.stuff_labels,
                                               sizes=sizes)
            for im, (h, w), res in zip(chunk, sizes, results):
                writer.add(im.path.name, w, h, res, image_id=im.image_id, png_name=im.png.name)
            used += chunk
        done += len(images[start : start + max(1, batch)])
        if progress is not None:
            progress(done, len(images))
    seconds = time.perf_counter() - t0
    if not used:
        raise EvalError(f"none of the {len(images)} images could be read (first: {skipped[0] if skipped else '?'})")
    pred_json = out_dir / PANOPTIC_JSON
    writer.write(pred_json, {"description": "ddetr eval --panoptic predictions", "threshold": threshold})
    gt_json = split.json_path
    if len(used) < len(split.images):  # score the evaluated images only
        gt = json.loads(split.json_path.read_text(encoding="utf-8"))
        keep = {im.image_id for im in used}
        gt["annotations"] = [a for a in gt["annotations"] if int(a["image_id"]) in keep]
        gt["images"] = [im for im in gt.get("images") or [] if int(im["id"]) in keep]
        gt_json = out_dir / "ground_truth.json"
        atomic_write_text(gt_json, json.dumps(gt))
    try:
        pq = pq_compute(gt_json, split.png_dir, pred_json, out_dir / "panoptic")
    except PQError as e:
        raise EvalError(str(e)) from None
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable images (left out of the ground truth too)")
    res = PanopticEvalResult(
        summary=pq.summary, per_class=pq.per_class, images=len(used), mapping=mapping, seconds=seconds,
        warnings=warnings, skipped=skipped,
        outputs={"panoptic": str(pred_json), "pngs": str(out_dir / "panoptic"), "ground_truth": str(gt_json)},
        settings={"threshold": threshold, "batch": batch, "max_images": max_images,
                  "imgsz": getattr(detector, "imgsz", None), "device": str(getattr(detector, "device", "")) or None},
        dataset={"root": str(split.root), "split": split.split, "json": str(split.json_path), "png_dir": str(split.png_dir),
                 "images": len(split.images), "categories": len(split.categories)},
    )
    metrics = out_dir / "metrics.json"
    res.outputs["metrics"] = str(metrics)
    atomic_write_text(metrics, json.dumps(res.to_dict(), indent=2))
    return res

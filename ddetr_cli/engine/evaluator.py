"""``ddetr eval``: COCO-style box (and mask) metrics of a detector on a dataset, as papers report them.

Everything numeric comes from pycocotools' ``COCOeval`` run on the exact predictions list that
``predictions.json`` holds, so the file can be re-scored by anyone and gives the same numbers::

    det = Detector.from_pretrained("demo")
    res = evaluate(det, load_dataset("examples/data/coco", "val"), out_dir=Path("runs/eval/exp"))
    res.metrics["AP"]          # AP@[.50:.95], all areas, 100 detections per image

Like the reference evaluation, every image keeps its top-``max_det`` (100) detections with no
score threshold: a threshold lowers AP because it cuts the low-precision tail of the PR curve.

Mask AP (COCOeval ``iouType="segm"``) is reported beside box AP when every ground-truth object
has a segmentation and the model returns masks. Predicted masks are scored as the COCO polygons
``ddetr detect --masks`` exports (``masks.mask_to_polygons``), so the number describes the file
users get.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ddetr_cli.data.datasets import Dataset, DatasetError, Record
from ddetr_cli.files import atomic_write_text
from ddetr_cli.formats.coco import coco_segmentation, coco_splits
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.masks import instance_polygons

# the 12 numbers of COCOeval.summarize(), in its order
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
METRIC_HELP = {
    "AP": "AP @ IoU 0.50:0.95", "AP50": "AP @ IoU 0.50", "AP75": "AP @ IoU 0.75",
    "APs": "AP small (< 32² px)", "APm": "AP medium", "APl": "AP large (> 96² px)",
    "AR1": "AR, 1 det/img", "AR10": "AR, 10 det/img", "AR100": "AR, 100 det/img",
    "ARs": "AR small", "ARm": "AR medium", "ARl": "AR large",
}


class EvalError(ValueError):
    """An evaluation that cannot be run as asked; the message is one line saying why."""


class PredictsArrays(Protocol):
    """What ``evaluate`` needs from a detector (``Detector`` or a stand-in in tests).

    A stand-in may set ``last_timing`` = {"preprocess", "inference", "postprocess"} seconds
    after each call; without it the whole call counts as inference.
    """

    labels: LabelTable

    def predict_arrays(self, images: Sequence[np.ndarray], conf: float = ..., max_det: int = ...,
                       classes: Sequence[int] | None = ...) -> list[Any]: ...


# --------------------------------------------------------------------------- class mapping


@dataclass
class ClassMapping:
    """Model label index -> ground-truth category id, and what could not be matched.

    mode: "id" (the model's label table carries the COCO dataset's category ids) or "name".
    """

    mode: str
    label_to_cat: dict[int, int]
    matched: list[str]
    model_only: list[str]
    dataset_only: list[str]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "matched": len(self.matched), "model_only": self.model_only,
                "dataset_only": self.dataset_only}


def match_classes(labels: LabelTable, dataset: Dataset) -> ClassMapping:
    """Match model labels to dataset categories: by id when the model's table carries this COCO
    dataset's ids (a published COCO model on COCO data, or a model fine-tuned on this dataset),
    else by name (case-insensitive).

    "Carries the ids" means at least half of the dataset's categories have the same name at the
    same id in the model's table.
    """
    return match_tables(labels, dataset.labels, ids_comparable=dataset.format == "coco")


def match_tables(labels: LabelTable, data: LabelTable, ids_comparable: bool = True) -> ClassMapping:
    """``match_classes`` for any dataset's label table ``data``; ids are compared only where
    ``ids_comparable`` (the dataset has its own category ids: COCO and COCO panoptic)."""
    ds = [(c.id, c.name) for c in data]
    ds_names = dict(ds)
    same_id = sum(1 for c in labels if ds_names.get(c.id, "").strip().lower() == c.name.strip().lower())
    label_to_cat: dict[int, int] = {}
    if ids_comparable and ds and same_id * 2 >= len(ds):
        mode = "id"
        label_to_cat = {c.label: c.id for c in labels if c.id in ds_names}
    else:
        mode = "name"
        by_name: dict[str, int] = {}
        for cid, n in ds:
            by_name.setdefault(n.strip().lower(), cid)
        for c in labels:
            cid = by_name.get(c.name.strip().lower())
            if cid is not None and cid not in label_to_cat.values():
                label_to_cat[c.label] = cid
    hit = set(label_to_cat.values())
    return ClassMapping(
        mode=mode,
        label_to_cat=label_to_cat,
        matched=[n for cid, n in ds if cid in hit],
        model_only=[c.name for c in labels if c.label not in label_to_cat],
        dataset_only=[n for cid, n in ds if cid not in hit],
    )


# --------------------------------------------------------------------------- ground truth


def _coco_annotation_file(dataset: Dataset) -> Path | None:
    """The annotation JSON a COCO dataset split was read from (None if it cannot be found)."""
    try:
        splits = coco_splits(Path(dataset.root))
    except Exception:  # a layout this helper does not know: fall back to the loaded records
        return None
    return splits.get(dataset.split) or splits.get("train")


def ground_truth(dataset: Dataset, records: Sequence[Record] | None = None) -> dict:
    """COCO ground-truth dict for pycocotools covering ``records`` (default: all of them).

    For COCO datasets the original annotations are used (crowd regions, segment areas and ids
    kept), since that is what the published numbers are computed against; YOLO/VOC boxes come
    from the loaded records with ``area = w * h``.
    """
    records = list(dataset.records if records is None else records)
    keep = {int(r.image_id) for r in records}
    categories = [{"id": c.id, "name": c.name, "supercategory": "none"} for c in dataset.labels]
    ann_file = _coco_annotation_file(dataset) if dataset.format == "coco" else None
    if ann_file is not None and ann_file.is_file():
        try:
            raw = json.loads(ann_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DatasetError(f"{ann_file}: cannot read ({e})") from None
        wanted = {c["id"] for c in categories}
        images = [im for im in raw.get("images", []) if int(im.get("id", -1)) in keep]
        annotations = []
        for a in raw.get("annotations") or []:
            if not isinstance(a, dict) or a.get("image_id") not in keep or a.get("category_id") not in wanted:
                continue
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
            except (KeyError, TypeError, ValueError):
                continue
            # a malformed segmentation becomes [] (no mask) instead of crashing pycocotools
            a = dict(a, bbox=[x, y, w, h], iscrowd=int(a.get("iscrowd", 0) or 0),
                     segmentation=coco_segmentation(a.get("segmentation")))
            a.setdefault("area", w * h)
            a["id"] = len(annotations) + 1  # ids must be unique for pycocotools; some exports repeat them
            annotations.append(a)
        by_id = {int(c["id"]): c for c in raw.get("categories", []) if isinstance(c, dict) and "id" in c}
        categories = [{**c, **by_id.get(c["id"], {})} for c in categories]  # keep the file's supercategories
        return {"info": raw.get("info") or {}, "licenses": [], "images": images,
                "annotations": annotations, "categories": categories}
    return dataset.to_coco_dict(records)


# --------------------------------------------------------------------------- COCOeval


def gt_has_masks(gt: dict) -> bool:
    """Whether every non-crowd ground-truth annotation has a segmentation (mask AP is defined)."""
    anns = [a for a in gt.get("annotations", []) if not a.get("iscrowd")]
    return bool(anns) and all(a.get("segmentation") for a in anns)


def run_cocoeval(gt: dict, predictions: Sequence[dict], iou_type: str = "bbox"):
    """pycocotools ``COCOeval`` after evaluate/accumulate/summarize, its printing silenced.

    gt: a COCO dataset dict; predictions: [{image_id, category_id, bbox [x, y, w, h], score}],
    plus ``segmentation`` (polygons or RLE) for ``iou_type="segm"``. An empty predictions list is
    scored too (everything a miss), which pycocotools' ``loadRes`` alone cannot do.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = dict(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if predictions:
            # loadRes adds fields to the dicts it is given; the caller's list stays as it was
            coco_dt = coco_gt.loadRes([dict(p) for p in predictions])
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"info": {}, "images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _box_polygon(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _stats_dict(stats: Sequence[float]) -> dict[str, float | None]:
    # COCOeval writes -1 where a number is undefined (no ground truth in that area range)
    return {k: (None if float(v) < 0 else float(v)) for k, v in zip(METRIC_NAMES, stats)}


def coco_metrics(gt: dict, predictions: Sequence[dict]) -> dict[str, float | None]:
    """The 12 COCOeval numbers {AP, AP50, ..., ARl} as fractions; None where undefined.

    Shared by ``ddetr eval`` and the training loop's validation. gt: a COCO dataset dict
    (images, annotations, categories); predictions: COCO results list with bbox xywh in pixels.
    """
    if not gt.get("images"):
        return {k: None for k in METRIC_NAMES}
    return _stats_dict(run_cocoeval(gt, predictions).stats)


def per_class_ap(ev: Any, gt: dict) -> list[dict]:
    """One row per category: AP, AP50, AP75 (None without ground truth), instances, images.

    From ``ev.eval["precision"]``: (T iou thresholds, R recall points, K classes, A areas, M max-dets).
    """
    prec = ev.eval["precision"]
    inst: Counter = Counter()
    imgs: dict[int, set] = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd"):
            inst[a["category_id"]] += 1
            imgs.setdefault(a["category_id"], set()).add(a["image_id"])
    names = {c["id"]: c["name"] for c in gt["categories"]}

    def mean(p: np.ndarray) -> float | None:
        v = p[p > -1]
        return float(v.mean()) if v.size else None

    rows = []
    for k, cid in enumerate(ev.params.catIds):
        p = prec[:, :, k, 0, -1]
        rows.append({"class": names.get(cid, str(cid)), "category_id": int(cid), "instances": inst[cid],
                     "images": len(imgs.get(cid, ())), "AP": mean(p), "AP50": mean(p[0]), "AP75": mean(p[5])})
    return rows


def plot_pr_curves(precision: np.ndarray, recall: np.ndarray, path: Path, title: str = "") -> Path | None:
    """PR curves at IoU 0.5, 0.75 and averaged over 0.5:0.95, each the mean over classes.

    precision: COCOeval's (T, R, K, A, M) array (area "all", 100 dets used); recall: (R,).
    Returns None (nothing written) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    p = precision[:, :, :, 0, -1]  # (T, R, K)
    valid = (p > -1).all(axis=(0, 1))  # classes with ground truth
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    if valid.any():
        p = p[:, :, valid]
        curves = [("IoU 0.50", p[0].mean(axis=1)), ("IoU 0.75", p[5].mean(axis=1)),
                  ("IoU 0.50:0.95", p.mean(axis=(0, 2)))]
        for (label, y), style in zip(curves, ("-", "--", ":")):
            ax.plot(recall, y, style, lw=2, label=f"{label}  AP {y.mean():.3f}")
        if p.shape[2] <= 20:  # per-class curves only while they stay readable
            for k in range(p.shape[2]):
                ax.plot(recall, p[0, :, k], color="0.75", lw=0.7, zorder=0)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=title or "precision-recall (mean over classes)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- running the model


def _predict_timed(detector: Any, images: list[np.ndarray], conf: float, max_det: int,
                   classes: list[int] | None) -> tuple[list[Any], tuple[float, float, float]]:
    """One batch -> (detections, (preprocess, inference, postprocess) seconds).

    A real ``Detector`` is run stage by stage (synchronising CUDA so each stage gets its own
    time); anything else is called through ``predict_arrays``.
    """
    from ddetr_cli.engine.predictor import Detector

    # a model with a mask head runs through predict_arrays, which knows how to return its masks
    if isinstance(detector, Detector) and not getattr(detector.cfg, "masks", False):
        import torch

        def sync() -> None:
            if detector.device.type == "cuda":
                torch.cuda.synchronize(detector.device)

        with torch.inference_mode():
            t0 = time.perf_counter()
            pixels, mask = detector.preprocess(images)
            sync()
            t1 = time.perf_counter()
            out = detector.infer(pixels, mask)
            sync()
            t2 = time.perf_counter()
            dets = detector.decode(out, mask, [im.shape[:2] for im in images], conf, max_det, classes)
            t3 = time.perf_counter()
        return dets, (t1 - t0, t2 - t1, t3 - t2)
    t0 = time.perf_counter()
    kw = {"classes": classes} if classes is not None else {}
    dets = detector.predict_arrays(images, conf=conf, max_det=max_det, **kw)
    total = time.perf_counter() - t0
    timing = getattr(detector, "last_timing", None)
    if isinstance(timing, dict):
        return dets, (float(timing.get("preprocess", 0.0)), float(timing.get("inference", 0.0)),
                      float(timing.get("postprocess", 0.0)))
    return dets, (0.0, total, 0.0)


def _read(record: Record) -> tuple[np.ndarray | None, str | None]:
    try:
        return record.read(), None
    except (DatasetError, OSError) as e:
        return None, str(e)


@dataclass
class EvalResult:
    """What ``evaluate`` measured. Metric values are fractions in [0, 1] (None = undefined)."""

    metrics: dict[str, float | None]
    per_class: list[dict]
    speed: dict[str, float]
    images: int
    detections: int
    mapping: ClassMapping
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list, repr=False)
    precision: np.ndarray | None = field(default=None, repr=False)  # COCOeval (T, R, K, A, M)
    mask_metrics: dict[str, float | None] | None = None  # the same 12 numbers for masks, when scored

    def to_dict(self) -> dict:
        return {
            "metrics": self.metrics,
            "mask_metrics": self.mask_metrics,
            "per_class": self.per_class,
            "speed": self.speed,
            "images": self.images,
            "detections": self.detections,
            "class_mapping": self.mapping.to_dict(),
            "warnings": self.warnings,
            "skipped": self.skipped,
            "dataset": self.dataset,
            "settings": self.settings,
            "outputs": self.outputs,
        }


def evaluate(
    detector: PredictsArrays,
    dataset: Dataset,
    *,
    batch: int = 1,
    max_images: int | None = None,
    conf: float = 0.0,
    max_det: int = 100,
    out_dir: Path | None = None,
    save_predictions: bool = False,
    plot: bool = True,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 2,
) -> EvalResult:
    """Run ``detector`` over ``dataset`` and score it with COCOeval.

    Images are decoded in ``workers`` threads one batch ahead of the model. Images that cannot
    be read are skipped and left out of the ground truth too (listed in ``skipped``). With
    ``out_dir``: ``metrics.json``, ``pr_curve.png`` and (``save_predictions``) ``predictions.json``,
    a COCO results list whose image/category ids are the dataset's own.

    Speed is per image, excluding the first batch (warm-up) when there is more than one.
    Raises EvalError when no model class matches any dataset class.
    """
    mapping = match_classes(detector.labels, dataset)
    if not mapping.label_to_cat:
        model_names = detector.labels.names
        raise EvalError(
            f"none of the model's {len(model_names)} classes ({_short(model_names)}) is in the dataset "
            f"({_short(dataset.class_names)}); evaluate on data with the model's classes or finetune it first")
    records = list(dataset.records)
    if max_images is not None:
        if max_images < 1:
            raise EvalError(f"--max-images must be at least 1, got {max_images}")
        records = records[:max_images]
    warnings: list[str] = []
    if mapping.model_only:
        warnings.append(f"{len(mapping.model_only)} model classes are not in the dataset, their detections are "
                        f"dropped: {_short(mapping.model_only)}")
    if mapping.dataset_only:
        warnings.append(f"{len(mapping.dataset_only)} dataset classes are unknown to the model and count as "
                        f"misses: {_short(mapping.dataset_only)}")
    # a COCO model on its own data keeps the reference top-100 over all labels; elsewhere the
    # top-k budget is spent only on classes that can be scored
    classes = sorted(mapping.label_to_cat) if mapping.mode == "name" and mapping.model_only else None

    from ddetr_cli.engine.predictor import Detector  # noqa: F401  (imported here so torch's import is not timed)

    batch = max(1, int(batch))
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    # masks are turned into polygons only where they can be scored
    want_masks = any(r.has_masks for r in records)
    masks_seen = False
    predictions: list[dict] = []
    used: list[Record] = []
    skipped: list[str] = []
    stage_times: list[tuple[int, float, float, float, float]] = []  # (n, decode, pre, model, post)
    rescaled = 0
    done = 0
    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def submit(b: list[Record]) -> list[Future]:
            return [pool.submit(_read, r) for r in b]

        pending = submit(batches[0]) if batches else []
        for bi, b in enumerate(batches):
            t0 = time.perf_counter()
            decoded = [f.result() for f in pending]
            t_dec = time.perf_counter() - t0
            pending = submit(batches[bi + 1]) if bi + 1 < len(batches) else []
            ok_recs, arrays = [], []
            for r, (img, err) in zip(b, decoded):
                if img is None:
                    skipped.append(err or f"{r.path}: unreadable")
                else:
                    ok_recs.append(r)
                    arrays.append(img)
            if arrays:
                dets_list, (tp, tm, tq) = _predict_timed(detector, arrays, conf, max_det, classes)
                stage_times.append((len(arrays), t_dec, tp, tm, tq))
                for r, img, dets in zip(ok_recs, arrays, dets_list):
                    h, w = img.shape[:2]
                    sx, sy = r.width / w, r.height / h
                    if (h, w) != (r.height, r.width):
                        rescaled += 1  # annotations made for another size: score in their pixels
                    polygons = instance_polygons(dets) if want_masks else None
                    masks_seen |= polygons is not None
                    predictions += to_coco_results(dets, int(r.image_id), mapping.label_to_cat, sx, sy, polygons,
                                               (r.height, r.width))
                used += ok_recs
            done += len(b)
            if progress is not None:
                progress(done, len(records))
    loop_seconds = time.perf_counter() - t_start

    if not used:
        raise EvalError(f"none of the {len(records)} images could be read (first: {skipped[0] if skipped else '?'})")
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable images (left out of the ground truth too)")
    if rescaled:
        warnings.append(f"{rescaled} images differ in size from their annotations; boxes were rescaled to the "
                        "annotated size")

    gt = ground_truth(dataset, used)
    if not gt["annotations"]:
        warnings.append("the evaluated images have no ground-truth boxes: metrics are undefined")
    if not predictions:
        warnings.append(f"the model made no detections on {len(used)} images: AP is 0.0")
    ev = run_cocoeval(gt, predictions)
    metrics = _stats_dict(ev.stats)
    rows = per_class_ap(ev, gt)
    unknown = set(mapping.dataset_only)
    for row in rows:
        row["in_model"] = row["class"] not in unknown
    mask_metrics = None
    model_masks = masks_seen or bool(getattr(getattr(detector, "cfg", None), "masks", False))
    if want_masks and model_masks:
        if gt_has_masks(gt):
            # crowd regions without a mask are ignored by their box, as in the box evaluation
            segm_gt = dict(gt, annotations=[a if a.get("segmentation") else dict(a, segmentation=[_box_polygon(a["bbox"])])
                                            for a in gt["annotations"]])
            ev_segm = run_cocoeval(segm_gt, predictions, "segm")
            mask_metrics = _stats_dict(ev_segm.stats)
            for row, mrow in zip(rows, per_class_ap(ev_segm, gt)):
                row.update({f"mask_{k}": mrow[k] for k in ("AP", "AP50", "AP75")})
        else:
            warnings.append("some ground-truth objects have no segmentation: mask AP is not reported")

    timed = stage_times[1:] if len(stage_times) > 1 else stage_times  # first batch = warm-up
    n_timed = sum(t[0] for t in timed) or 1
    speed = {
        "decode_ms": 1000 * sum(t[1] for t in timed) / n_timed,
        "preprocess_ms": 1000 * sum(t[2] for t in timed) / n_timed,
        "inference_ms": 1000 * sum(t[3] for t in timed) / n_timed,
        "postprocess_ms": 1000 * sum(t[4] for t in timed) / n_timed,
        "images_per_second": len(used) / loop_seconds if loop_seconds > 0 else 0.0,
        "seconds": loop_seconds,
        "warmup_excluded": len(stage_times) > 1,
    }
    model_ms = speed["preprocess_ms"] + speed["inference_ms"] + speed["postprocess_ms"]
    speed["model_images_per_second"] = 1000.0 / model_ms if model_ms > 0 else 0.0
    speed = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in speed.items()}

    res = EvalResult(
        metrics=metrics, per_class=rows, speed=speed, images=len(used), detections=len(predictions),
        mapping=mapping, warnings=warnings, skipped=skipped,
        settings={"conf": conf, "max_det": max_det, "batch": batch, "max_images": max_images,
                  "imgsz": getattr(detector, "imgsz", None), "half": getattr(detector, "half", None),
                  "dtype": str(getattr(detector, "dtype", "")).replace("torch.", "") or None,
                  "device": str(getattr(detector, "device", "")) or None},
        dataset={"root": str(dataset.root), "format": dataset.format, "split": dataset.split,
                 "images": len(dataset.records), "classes": len(dataset.class_names),
                 "boxes": len(gt["annotations"]), "notes": dataset.report.summary()[1:]},
        predictions=predictions, precision=ev.eval["precision"], mask_metrics=mask_metrics,
    )
    if out_dir is not None:
        write_outputs(res, Path(out_dir), save_predictions=save_predictions, plot=plot, recall=ev.params.recThrs)
    return res


def to_coco_results(dets: Any, image_id: int, label_to_cat: dict[int, int], sx: float = 1.0, sy: float = 1.0,
                polygons: Sequence[list[list[float]]] | None = None, size: tuple[int, int] | None = None) -> list[dict]:
    """sv.Detections (xyxy pixels) -> COCO results rows; labels without a category are dropped.

    Values are rounded here, before scoring, so the saved file re-scores to the same numbers.
    ``polygons`` (per detection) add ``segmentation``, scaled like the boxes; an empty mask is
    written as an empty RLE of the annotated ``size`` (h, w), which pycocotools scores as a miss
    (it cannot read an empty polygon list).
    """
    rows = []
    conf = dets.confidence if dets.confidence is not None else np.ones(len(dets))
    for i, ((x1, y1, x2, y2), score, label) in enumerate(zip(np.asarray(dets.xyxy, dtype=np.float64), conf, dets.class_id)):
        cat = label_to_cat.get(int(label))
        if cat is None:
            continue
        x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
        row = {"image_id": image_id, "category_id": cat,
               "bbox": [round(float(x1), 3), round(float(y1), 3), round(float(x2 - x1), 3), round(float(y2 - y1), 3)],
               "score": round(float(score), 6)}
        if polygons is not None:
            if polygons[i]:
                row["segmentation"] = [[round(v * (sx if k % 2 == 0 else sy), 3) for k, v in enumerate(p)] for p in polygons[i]]
            else:
                h, w = size if size is not None else dets.mask.shape[1:]
                row["segmentation"] = {"size": [int(h), int(w)], "counts": [int(h) * int(w)]}
        rows.append(row)
    return rows


def write_outputs(res: EvalResult, out_dir: Path, *, save_predictions: bool = False, plot: bool = True,
                  recall: np.ndarray | None = None) -> None:
    """metrics.json, pr_curve.png and optionally predictions.json into ``out_dir``; fills ``res.outputs``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if save_predictions:
        p = out_dir / "predictions.json"
        atomic_write_text(p, json.dumps(res.predictions))
        res.outputs["predictions"] = str(p)
    if plot and res.precision is not None and res.precision.size:
        rec = recall if recall is not None else np.linspace(0.0, 1.0, res.precision.shape[1])
        ap = res.metrics.get("AP")
        title = f"PR curves, AP {ap:.3f}" if ap is not None else ""
        png = plot_pr_curves(res.precision, rec, out_dir / "pr_curve.png", title)
        if png is not None:
            res.outputs["pr_curve"] = str(png)
        else:
            res.warnings.append("matplotlib is not installed: no pr_curve.png (pip install matplotlib)")
    m = out_dir / "metrics.json"
    res.outputs["metrics"] = str(m)
    atomic_write_text(m, json.dumps(res.to_dict(), indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if math.isnan(float(o)) else float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _short(names: Sequence[str], n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")

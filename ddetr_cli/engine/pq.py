"""Panoptic quality (Kirillov et al., 2019) of COCO panoptic predictions against ground truth,
computed from the files (PNG + JSON), as panopticapi's ``pq_compute`` defines it:

- a predicted and a ground-truth segment of one category match when their IoU is above 0.5
  (such matches are unique); the IoU leaves out the prediction's pixels on unlabeled (void)
  ground truth;
- unmatched ground-truth segments are false negatives, except crowd regions;
- unmatched predicted segments are false positives, unless more than half of them lies on void
  or on a crowd region of their own category;
- per category PQ = sum of matched IoUs / (TP + FP/2 + FN/2) = SQ * RQ; the overall, things and
  stuff numbers are means over the categories that occur (TP + FP + FN > 0).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddetr_cli.formats.panoptic import read_segment_png

OFFSET = 256 * 256 * 256  # ids are below this: gt * OFFSET + pred encodes a pair in one int64


class PQError(ValueError):
    """Prediction files that cannot be scored; the message is one line."""


@dataclass
class CategoryStat:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0

    def add(self, other: CategoryStat) -> None:
        self.tp, self.fp, self.fn, self.iou = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou + other.iou


@dataclass
class PQResult:
    """``summary``: {"All", "Things", "Stuff"} -> {pq, sq, rq, n (categories averaged)};
    ``per_class``: one row per category (pq, sq, rq, tp, fp, fn; None where it does not occur)."""

    summary: dict[str, dict[str, float]]
    per_class: list[dict] = field(default_factory=list)
    images: int = 0


def image_stats(gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray, pred_segments: list[dict],
                categories: set[int]) -> dict[int, CategoryStat]:
    """One image: (H, W) ground-truth and predicted id maps and their ``segments_info`` -> per
    category TP/FP/FN and summed IoU. Raises PQError for a predicted id the JSON does not list
    (or the other way round) or an unknown category."""
    if gt_ids.shape != pred_ids.shape:
        raise PQError(f"prediction is {pred_ids.shape[1]}x{pred_ids.shape[0]}, ground truth {gt_ids.shape[1]}x{gt_ids.shape[0]}")
    gt = {int(s["id"]): s for s in gt_segments}
    pred = {int(s["id"]): s for s in pred_segments}
    for s in pred.values():
        if int(s["category_id"]) not in categories:
            raise PQError(f"predicted segment {s['id']} has category {s['category_id']}, which the ground truth does not list")
    pred_area = dict(zip(*(v.tolist() for v in np.unique(pred_ids, return_counts=True))))
    gt_area = dict(zip(*(v.tolist() for v in np.unique(gt_ids, return_counts=True))))
    missing = set(pred_area) - set(pred) - {0}
    if missing:
        raise PQError(f"the PNG has segment ids {sorted(missing)[:5]} that segments_info does not list")
    pairs, counts = np.unique(gt_ids.astype(np.int64) * OFFSET + pred_ids.astype(np.int64), return_counts=True)
    inter = {(int(p // OFFSET), int(p % OFFSET)): int(c) for p, c in zip(pairs, counts)}
    stats: dict[int, CategoryStat] = defaultdict(CategoryStat)
    gt_hit, pred_hit = set(), set()
    for (g, p), n in inter.items():
        if g not in gt or p not in pred or gt[g].get("iscrowd", 0):
            continue
        cat = int(gt[g]["category_id"])
        if cat != int(pred[p]["category_id"]):
            continue
        union = pred_area.get(p, 0) + gt_area.get(g, 0) - n - inter.get((0, p), 0)
        iou = n / union if union else 0.0
        if iou > 0.5:
            stats[cat].tp += 1
            stats[cat].iou += iou
            gt_hit.add(g)
            pred_hit.add(p)
    crowd: dict[int, int] = {}
    for g, s in gt.items():
        if g in gt_hit:
            continue
        if s.get("iscrowd", 0):
            crowd[int(s["category_id"])] = g
            continue
        stats[int(s["category_id"])].fn += 1
    for p, s in pred.items():
        if p in pred_hit or not pred_area.get(p, 0):
            continue
        cat = int(s["category_id"])
        ignored = inter.get((0, p), 0) + (inter.get((crowd[cat], p), 0) if cat in crowd else 0)
        if ignored / pred_area[p] > 0.5:
            continue
        stats[cat].fp += 1
    return dict(stats)


def summarize(stats: dict[int, CategoryStat], categories: list[dict]) -> PQResult:
    """Per-category stats over a dataset -> PQ, SQ, RQ overall, for things and for stuff."""
    rows = []
    groups: dict[str, list[tuple[float, float, float]]] = {"All": [], "Things": [], "Stuff": []}
    for c in categories:
        cid = int(c["id"])
        s = stats.get(cid, CategoryStat())
        row = {"id": cid, "class": c.get("name", str(cid)), "isthing": int(c.get("isthing", 1)),
               "tp": s.tp, "fp": s.fp, "fn": s.fn, "pq": None, "sq": None, "rq": None}
        if s.tp + s.fp + s.fn:
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            pq, sq, rq = s.iou / denom, (s.iou / s.tp if s.tp else 0.0), s.tp / denom
            row.update(pq=pq, sq=sq, rq=rq)
            groups["All"].append((pq, sq, rq))
            groups["Things" if row["isthing"] else "Stuff"].append((pq, sq, rq))
        rows.append(row)
    summary = {}
    for name, vals in groups.items():
        arr = np.array(vals, np.float64).reshape(-1, 3)
        mean = arr.mean(0) if len(arr) else np.zeros(3)
        summary[name] = {"pq": float(mean[0]), "sq": float(mean[1]), "rq": float(mean[2]), "n": len(arr)}
    return PQResult(summary=summary, per_class=rows)


def _load(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PQError(f"{path}: cannot read ({e})") from None


def pq_compute(gt_json: Path, gt_folder: Path, pred_json: Path, pred_folder: Path) -> PQResult:
    """PQ of the predictions (``pred_json`` + PNGs in ``pred_folder``) on every image of the
    ground truth (``gt_json`` + ``gt_folder``), matched by ``image_id``; a ground-truth image
    without a prediction counts with an empty one. Categories (and isthing) are the ground truth's."""
    gt, pred = _load(gt_json), _load(pred_json)
    categories = sorted(gt.get("categories") or [], key=lambda c: int(c["id"]))
    cat_ids = {int(c["id"]) for c in categories}
    preds = {int(a["image_id"]): a for a in pred.get("annotations") or []}
    total: dict[int, CategoryStat] = defaultdict(CategoryStat)
    for ann in gt.get("annotations") or []:
        gt_ids = read_segment_png(Path(gt_folder) / ann["file_name"])
        p = preds.get(int(ann["image_id"]))
        if p is None:
            pred_ids, pred_segments = np.zeros_like(gt_ids), []
        else:
            pred_ids, pred_segments = read_segment_png(Path(pred_folder) / p["file_name"]), p.get("segments_info") or []
        try:
            per_image = image_stats(gt_ids, ann.get("segments_info") or [], pred_ids, pred_segments, cat_ids)
        except PQError as e:
            raise PQError(f"image {ann['image_id']}: {e}") from None
        for cat, s in per_image.items():
            total[cat].add(s)
    res = summarize(total, categories)
    res.images = len(gt.get("annotations") or [])
    return res

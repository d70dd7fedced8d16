"""Independent scoring for tests: pycocotools run on the two files, as a user would run it."""

from __future__ import annotations

from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def cocoeval_stats(gt_file: Path, pred_file: Path, iou_type: str = "bbox") -> list[float]:
    """The 12 COCOeval numbers (-1 where undefined) of ``pred_file`` against ``gt_file``."""
    gt = COCO(str(gt_file))
    ev = COCOeval(gt, gt.loadRes(str(pred_file)), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(s) for s in ev.stats]

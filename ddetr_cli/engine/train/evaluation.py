"""Validation during training: ``evaluate_map`` (``ddetr eval``'s own path) and the hook that
turns it into last.safetensors / best.safetensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ddetr_cli.data.datasets import Dataset
from ddetr_cli.engine.predictor import Detector
from ddetr_cli.engine.train.dist import broadcast
from ddetr_cli.engine.train.hooks import HookBase, Trainer
from ddetr_cli.weights.load import save_model


@torch.no_grad()
def evaluate_map(model: nn.Module, dataset: Dataset, imgsz: int, device: torch.device, batch: int = 4,
                 workers: int = 0) -> dict[str, float]:
    """COCO mAP of ``model`` on ``dataset``: {"AP", "AP50", "AP75"} (fractions, 0 if undefined),
    and {"mask_AP", "mask_AP50"} when the model has a mask head and the data segmentations.

    This is ``ddetr eval``'s own path (``Detector`` preprocessing and post-processing, top 100
    without threshold, the same COCOeval), with the model left unfused so training goes on: the
    number that picks ``best.safetensors`` is the number ``ddetr eval`` reports for it.
    """
    from ddetr_cli.engine.evaluator import evaluate

    was_training = model.training
    try:
        detector = Detector(model, device=device, imgsz=imgsz, optimize=False)
        res = evaluate(detector, dataset, batch=batch, conf=0.0, max_det=100, plot=False, workers=max(1, workers))
    finally:
        model.train(was_training)
    out = {k: res.metrics[k] or 0.0 for k in ("AP", "AP50", "AP75")}
    if res.mask_metrics is not None:
        out.update(mask_AP=res.mask_metrics["AP"] or 0.0, mask_AP50=res.mask_metrics["AP50"] or 0.0)
    return out


class BestCheckpoint(HookBase):
    """At each epoch end: val mAP of the evaluated weights (EMA when on) on rank 0, shared with
    every rank and added to ``epoch_log`` (AP, AP50, AP75, improved); then last.safetensors, and
    best.safetensors when the mAP improved (every epoch when there is no val split)."""

    def __init__(self, val_set: Dataset | None, imgsz: int) -> None:
        self.val_set, self.imgsz = val_set, imgsz
        self.best_ap = -1.0
        self.best_epoch = -1

    def after_epoch(self, trainer: Trainer) -> None:
        metrics = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        if trainer.info.main and self.val_set is not None:
            metrics = evaluate_map(trainer.eval_model(), self.val_set, self.imgsz, trainer.device)
        metrics = broadcast(metrics, trainer.info)
        epoch = trainer.epoch_log["epoch"]
        improved = metrics["AP"] > self.best_ap or self.val_set is None
        if improved:
            self.best_ap, self.best_epoch = metrics["AP"], epoch
        trainer.epoch_log.update(metrics, improved=improved)
        if trainer.info.main:
            meta = {"epoch": str(epoch), "val_AP": f"{metrics['AP']:.5f}", "run": str(trainer.run_dir)}
            save_model(trainer.eval_model(), trainer.run_dir / "last.safetensors", extra_meta=meta)
            if improved:
                save_model(trainer.eval_model(), trainer.run_dir / "best.safetensors", extra_meta=meta)

    def state_dict(self) -> dict[str, Any]:
        return {"best_ap": self.best_ap, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_ap, self.best_epoch = state["best_ap"], state["best_epoch"]

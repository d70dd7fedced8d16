"""Fine-tuning engine: ``ddetr finetune DATA`` and its Python API (the code is in
``ddetr_cli/engine/train/``; this module keeps the public names in one place).

The recipe is the reference one (Hungarian matching, focal/L1/GIoU losses with auxiliary and
encoder terms, AdamW with a 10x smaller backbone lr and 0.1x for sampling offsets / reference
points, grad clip 0.1, one StepLR drop, flip + multi-scale resize/crop), plus AMP on GPU, EMA
weights, gradient accumulation, early stopping on val mAP and DDP through ``torchrun``.
DETR models (``arch: detr``) train with DETR's own loss (``losses.build_criterion``); a DETR mask
head is kept frozen (boxes only: the datasets here have no masks).

A run lives in ``<out>/expN`` (``out`` defaults to ``runs/finetune``)::

    args.json          options used (resolved)
    last.pt            full training state (model, EMA, optimizer, scheduler, RNG, position)
    last.safetensors   weights at the end of the last finished epoch (project format)
    best.safetensors   weights with the best val mAP@[.5:.95] (project format; for detect/eval)
    results.csv        one row per epoch
    results.png        loss and mAP curves
    progress.json      position of the last checkpoint (for monitoring)

Exact resume: the sample order of an epoch is a permutation seeded by (seed, epoch) and each
sample's augmentation uses a generator seeded by (seed, epoch, index), so the data of any step
is a function of its position alone; the rest of the randomness (dropout) comes from the global
torch generator, whose state is saved with every checkpoint. Checkpoints are written every
``save_period`` optimizer steps, at each epoch end and on Ctrl-C (at the step reached), always
via a temporary file and ``os.replace``.

A step whose loss is not finite is skipped; ``NONFINITE_LIMIT`` (5) of them in a row, or a whole
epoch of them, stop the run as diverged (``TrainingDiverged``, exit 2, nothing registered).

Run it distributed with ``torchrun --nproc-per-node N -m ddetr_cli finetune DATA ...``.
"""

from __future__ import annotations

from ddetr_cli.engine.train.api import finetune, finetune_command
from ddetr_cli.engine.train.data import TrainSet, collate, epoch_batches
from ddetr_cli.engine.train.dist import DistInfo
from ddetr_cli.engine.train.evaluation import evaluate_map
from ddetr_cli.engine.train.hooks import NONFINITE_LIMIT, HookBase, TrainingDiverged
from ddetr_cli.engine.train.loop import FinetuneResult, Trainer, TrainingInterrupted
from ddetr_cli.engine.train.model import ModelEMA, param_groups, starting_model

__all__ = [
    "NONFINITE_LIMIT", "DistInfo", "FinetuneResult", "HookBase", "ModelEMA", "TrainSet", "Trainer",
    "TrainingDiverged", "TrainingInterrupted", "collate", "epoch_batches", "evaluate_map", "finetune",
    "finetune_command", "param_groups", "starting_model",
]

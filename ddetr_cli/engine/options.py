"""What a fine-tuning run is asked to do: every option declared once (``FinetuneOptions``), its
checks, and ``--arch`` parsing. Light on purpose (no torch): the CLI builds ``ddetr finetune``'s
flags from it at start-up."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ddetr_cli.models.config import BACKBONES, VIT_SIZES, ModelConfig


def option(default: Any, help: str, *, flag: str | None = None, short: str | None = None,
           min: float | None = None) -> Any:
    """A ``FinetuneOptions`` field that ``ddetr finetune`` shows as a flag with this help."""
    meta = {"help": help, "flag": flag, "short": short, "min": min}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


DEFAULT_OUT = "runs/finetune"


class FinetuneError(ValueError):
    """A problem with the request (options, run folder, resume); the message is one line."""


# ---------------------------------------------------------------------------------------------
# options


@dataclass
class FinetuneOptions:
    """Every option of a fine-tuning run, declared once: ``args.json`` records them, the Python API
    (``finetune(**options)``) takes them, and ``ddetr finetune`` builds its flags from this
    class (``option``'s help; ``--name-with-dashes``; booleans as ``--x/--no-x``)."""

    data: str = ""
    model: str | None = option(None, "Start from these weights (registry name or path). Default: the COCO model.", short="-m")
    scratch: bool = option(False, "Start from random weights (with --variant / --arch).", flag="--scratch")
    variant: str = option("multi-scale", "With --scratch: single-scale, single-scale-dc5, multi-scale, box-refine, "
                          "two-stage, detr, detr-dc5.")
    arch: list[str] = option([], "For a new model (--scratch or --backbone vit-*): KEY=VALUE model settings, "
                             "e.g. backbone_depth=18 d_model=128 vit_depth=4 (repeatable). With a pretrained "
                             "ResNet model: only masks=true, which adds a new mask head (train it with --freeze-boxes; its attention maps "
                             "enter scaled unless mask_attention=softmax, DETR's original).")
    # "vit-small"/"vit-base": a new model on that backbone unless ``model`` is one; None/"resnet":
    # the model as given. A pretrained ``model`` must have this backbone.
    backbone: str | None = option(None, "vit-small or vit-base: a new model on a ViT backbone (unless --model is a "
                                  "ViT one); resnet: the default.")
    backbone_weights: str | None = option(None, "With --backbone vit-*: timm-layout ViT weights (.safetensors, .pth, .bin).")
    format: str | None = option(None, "Force the dataset format: coco, yolo or voc (default: detected).")
    train_masks: bool = option(True, "DETR with a mask head on data with segmentations (COCO polygons or RLE): train the "
                               "mask head too (focal + dice loss on the matched masks); --no-train-masks keeps it as it is.")
    freeze_boxes: bool = option(False, "Train the mask head only; the detector (backbone, transformer, class and box heads) "
                                "keeps its weights (DETR's second training step).", flag="--freeze-boxes")
    val_fraction: float = option(0.2, "Share of the train split held out for validation when there is no val split.")
    epochs: int = option(50, "Epochs.", min=1)
    batch: int = option(2, "Images per step per device.", min=1)
    imgsz: int = option(800, "Short side of the training scale (the reference sizes times imgsz/800).", min=32)
    lr: float = option(2e-4, "Learning rate.")
    lr_backbone: float | None = option(None, "Backbone learning rate (default lr/10).")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    clip_max_norm: float = option(0.1, "Gradient clipping norm (0 = off).")
    lr_drop: int | None = option(None, "Epochs before the x0.1 LR drop (default 80% of the epochs).", min=1)
    accumulate: int = option(1, "Micro-batches per optimizer step.", min=1)
    amp: bool = option(True, "Mixed precision on GPU (bf16 where supported).")
    ema: bool = option(True, "Keep EMA weights (used for validation and best).")
    ema_decay: float = option(0.9998, "EMA decay.")
    patience: int = option(0, "Stop after this many epochs without val mAP gain (0 = never).", min=0)
    workers: int = option(2, "Data-loading worker processes (0 = in-process).", min=0)
    seed: int = option(0, "Random seed.")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available).")
    max_steps: int | None = option(None, "Stop after this many optimizer steps (validated and saved).", min=1)
    save_period: int = option(100, "Optimizer steps between resumable checkpoints (0 = epoch ends only).", min=0)
    name: str | None = option(None, "Register the best model under this name (default: the run folder's name, "
                              "made unique).")
    force: bool = option(False, "Re-point --name if it is already registered.", flag="--force")
    out: str = option(DEFAULT_OUT, "Parent folder of the run folders.")
    register: bool = option(True, "Register the best model by name.")
    deterministic: bool = option(True, "Deterministic algorithms.")
    verbose: bool = True

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch >= 1, "--batch must be >= 1"),
            (self.imgsz >= 32, "--imgsz must be >= 32"),
            (self.lr > 0, "--lr must be > 0"),
            (self.accumulate >= 1, "--accumulate must be >= 1"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.patience >= 0, "--patience must be >= 0"),
            (self.save_period >= 0, "--save-period must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.lr_drop is None or self.lr_drop >= 1, "--lr-drop must be >= 1"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (0 < self.ema_decay < 1, "--ema-decay must be in (0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FinetuneError(msg)
        if self.name is not None and self.register:
            from ddetr_cli.weights.store import ModelNameError, check_name

            try:  # before training, not after
                check_name(self.name, self.force)
            except ModelNameError as e:
                raise FinetuneError(f"--name: {e}") from None
        if self.backbone is not None and self.backbone not in BACKBONES:
            raise FinetuneError(f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.arch and not self.new_model and not set(parse_arch(self.arch)) <= {"masks", "mask_attention"}:
            raise FinetuneError("--arch only applies to a new model, with --scratch or --backbone vit-* "
                                "(a pretrained model fixes the architecture; it can only gain a mask head: --arch masks=true, "
                                "optionally mask_attention=softmax|scaled)")
        if self.backbone_weights and not (self.new_model and self.backbone in VIT_SIZES):
            raise FinetuneError("--backbone-weights applies to a new ViT-backbone model: give --backbone "
                                f"{'|'.join(VIT_SIZES)} and no --model")

    @property
    def new_model(self) -> bool:
        """A freshly built model: --scratch, or a ViT backbone without a (ViT) --model to start from."""
        return self.scratch or (self.backbone in VIT_SIZES and self.model is None)


def parse_arch(items: Sequence[str]) -> dict[str, Any]:
    """["d_model=64", "two_stage=true"] -> typed ModelConfig overrides (no eval of user text)."""
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        fixed = ("class_names", "category_ids", "stuff_ids", "num_classes", "imgsz")  # set from the dataset / --imgsz
        if not sep or key not in types or key in fixed:
            allowed = ", ".join(k for k in types if k not in fixed)
            raise FinetuneError(f"bad --arch {item!r}: expected KEY=VALUE with KEY one of {allowed}")
        t = str(types[key])
        raw = raw.strip()
        try:
            if "bool" in t:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                out[key] = raw.lower() in ("1", "true", "yes")
            elif "int" in t:
                out[key] = int(raw)
            elif "float" in t:
                out[key] = float(raw)
            else:
                out[key] = raw
        except ValueError:
            raise FinetuneError(f"bad --arch value {item!r} ({key} is {t})") from None
    return out


# ---------------------------------------------------------------------------------------------
# distributed helpers

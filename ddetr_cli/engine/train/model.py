"""What is trained and how: the starting model, the optimizer's parameter groups and EMA weights."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddetr_cli.engine.options import FinetuneError, FinetuneOptions, parse_arch
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.models.build import build_model
from ddetr_cli.models.config import VIT_SIZES, ModelConfig
from ddetr_cli.models.deformable_detr import DeformableDETR
from ddetr_cli.weights.load import load_state_dict_strict, read_weights
from ddetr_cli.weights.vit import load_timm_vit


def resolve_model_path(model: str | None) -> Path:
    """A path or registry name -> weights path (registry pulls hub models when needed)."""
    if model and Path(model).expanduser().exists():
        return Path(model).expanduser()
    try:
        from ddetr_cli.weights.store import resolve
    except ImportError:
        raise FinetuneError(f"model {model!r} is not a file and no model registry is available; pass a weights path or --scratch") from None
    try:
        return Path(resolve(model))
    except LookupError as e:
        raise FinetuneError(f"{e}; or use --scratch") from None
    except ImportError as e:  # hub download support (huggingface-hub) not installed
        raise FinetuneError(f"cannot fetch model {model or 'default'!r} ({e}); pass a weights path or --scratch") from None


def starting_model(labels: LabelTable, opts: FinetuneOptions) -> tuple[DeformableDETR, str]:
    """The model to fine-tune (on a dataset whose label table is ``labels``) and a line saying
    where it came from.

    From pretrained weights everything is kept; the class heads are re-initialised when the
    dataset's class names (in order) differ from the checkpoint's. The config records the
    dataset's category ids (so pre-labels carry them) and ``imgsz`` (the default input size of
    the fine-tuned model downstream). Tracking thresholds measured for the starting model are
    dropped: training changes the scores they were chosen for.
    """
    model, source = _starting_model(labels.names, opts)
    # Same architecture, only the recorded ids and input size change: safe to swap the config.
    model.cfg = dataclasses.replace(model.cfg, imgsz=opts.imgsz, category_ids=[c.id for c in labels],
                                    stuff_ids=[c.id for c in labels if not c.isthing], track_high=None, track_low=None)
    return model, source


def _starting_model(class_names: list[str], opts: FinetuneOptions) -> tuple[DeformableDETR, str]:
    n = len(class_names)
    if opts.new_model:
        arch = parse_arch(opts.arch)
        if opts.backbone:
            if arch.setdefault("backbone", opts.backbone) != opts.backbone:
                raise FinetuneError(f"--backbone {opts.backbone} contradicts --arch backbone={arch['backbone']}")
        try:
            cfg = ModelConfig.from_variant(opts.variant, **_new_head_arch(arch), num_classes=n, class_names=list(class_names))
        except (TypeError, ValueError) as e:
            raise FinetuneError(f"bad model configuration: {e}") from None
        model = build_model(cfg)
        model.backbone.body.prepare_scratch_()  # no ImageNet weights: make the body trainable as a whole
        source = f"random init ({cfg.variant}, {cfg.backbone_label}, d_model {cfg.d_model})"
        if opts.backbone_weights:
            note = load_timm_vit(model.backbone.body, opts.backbone_weights)
            source += f", ViT weights from {opts.backbone_weights}" + (f" ({note})" if note else "")
        return model, source
    path = resolve_model_path(opts.model)
    cfg, sd, layout = read_weights(path)
    if opts.backbone and cfg.backbone != opts.backbone:
        raise FinetuneError(f"--backbone {opts.backbone}: {path} has a {cfg.backbone} backbone"
                            + (f" (leave out --model to train a new {opts.backbone} model)" if opts.backbone in VIT_SIZES else ""))
    new_head, note = _added_mask_head(cfg, opts, path)
    add_head = new_head is not None
    if add_head:
        cfg = new_head
    if list(cfg.class_names) == list(class_names) and cfg.num_classes == n:
        model = build_model(cfg)
        load_state_dict_strict(model, sd, source=str(path), new_mask_head=add_head)
        return model, f"{path} ({layout}), all weights kept{note}"
    new_cfg = dataclasses.replace(cfg, num_classes=n, class_names=list(class_names), category_ids=[])
    model = build_model(new_cfg)
    own = model.state_dict()
    # Keep every tensor but the class heads, which take the fresh (prior-biased) init.
    sd = {k: v for k, v in sd.items() if "class_embed" not in k}
    sd.update({k: v for k, v in own.items() if "class_embed" in k})
    load_state_dict_strict(model, sd, source=str(path), new_mask_head=add_head)
    return model, f"{path} ({layout}), class head re-initialised for {n} classes (was {cfg.num_classes}){note}"


def _new_head_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """--arch settings of a model given a new mask head (masks=true): its attention maps enter
    scaled unless the settings say otherwise (see ModelConfig.mask_attention)."""
    return {"mask_attention": "scaled", **arch} if arch.get("masks") else arch


def _added_mask_head(cfg: ModelConfig, opts: FinetuneOptions, path: Path) -> tuple[ModelConfig | None, str]:
    """``--arch masks=true`` on a pretrained model: (the config with a new mask head, or None
    when none is added; a note for the source line). The options' validation allows no other
    --arch key here than mask_attention, which only a new head can choose."""
    arch = parse_arch(opts.arch)
    wanted = arch.get("masks")
    if wanted is None or wanted == cfg.masks:
        if cfg.masks and arch.get("mask_attention", cfg.mask_attention) != cfg.mask_attention:
            raise FinetuneError(f"--arch mask_attention={arch['mask_attention']}: the mask head of {path} was trained "
                                f"with {cfg.mask_attention} maps; only a new head can choose")
        if "mask_attention" in arch and not cfg.masks:
            raise FinetuneError("--arch mask_attention applies to a new mask head: add --arch masks=true")
        return None, ""
    if not wanted:
        raise FinetuneError(f"--arch masks=false: {path} has a mask head; use --no-train-masks to leave it as it is")
    try:
        return dataclasses.replace(cfg, masks=True, mask_attention=_new_head_arch(arch)["mask_attention"]), ", new mask head"
    except ValueError as e:
        raise FinetuneError(f"--arch masks=true: {e}") from None


def resumed_model(model_config: dict, weights: dict, opts: FinetuneOptions) -> DeformableDETR:
    """The model of an interrupted run, from its last.pt's config and weights."""
    model = build_model(ModelConfig.from_dict(model_config))
    if opts.new_model:  # same trainable set (hence optimizer layout) as the interrupted run
        model.backbone.body.prepare_scratch_()
    load_state_dict_strict(model, weights, source="last.pt")
    return model


def param_groups(model: nn.Module, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
    """Backbone at ``lr_backbone``; sampling offsets and reference points at lr/10; rest at lr."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "offsets": [], "rest": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif "reference_points" in name or "sampling_offsets" in name:
            groups["offsets"].append(p)
        else:
            groups["rest"].append(p)
    rates = {"backbone": lr_backbone, "offsets": lr * 0.1, "rest": lr}
    return [{"params": ps, "lr": rates[k], "weight_decay": weight_decay, "name": k} for k, ps in groups.items() if ps]


class ModelEMA:
    """Exponential moving average of weights with a warm-up: decay * (1 - exp(-updates / tau)),
    so short fine-tunes are not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0, updates: int = 0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        # parameters()/buffers() list shared tensors (tied heads) once, so nothing is averaged twice.
        for e, m in zip(self.module.parameters(), model.parameters()):
            e.lerp_(m.detach(), 1 - d)
        for e, m in zip(self.module.buffers(), model.buffers()):
            e.copy_(m)

"""One constructor for every model family."""

from __future__ import annotations

from torch import nn

from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.deformable_detr import DeformableDETR
from ddetr_cli.models.detr import DETR


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg`` describes (its ``arch``), freshly initialised. The one constructor
    loaders and training use, so every model family goes through the same commands."""
    if cfg.arch == "deformable-detr":
        return DeformableDETR(cfg)
    if cfg.arch == "detr":
        return DETR(cfg)
    raise ValueError(f"arch {cfg.arch!r} is not implemented yet")

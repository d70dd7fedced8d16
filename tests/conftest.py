"""Shared fixtures: a tiny random model in the project's format, isolated caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TINY_CLASSES = ["circle", "square", "triangle", "cross", "ring"]


def tiny_config(**kw):
    from ddetr_cli.models.config import ModelConfig

    base = dict(
        num_classes=5, class_names=TINY_CLASSES, backbone_depth=18, d_model=64, nheads=4,
        enc_layers=1, dec_layers=1, dim_feedforward=128, num_queries=20,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A randomly initialised small multi-scale model saved in the project's own format."""
    from ddetr_cli.models.deformable_detr import DeformableDETR
    from ddetr_cli.weights.load import save_model

    torch.manual_seed(0)
    model = DeformableDETR(tiny_config())
    # a random model's class logits sit at the prior (-4.6): lift them so detections appear
    with torch.no_grad():
        for head in model.class_embed:
            head.bias.normal_(0.0, 1.0)
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny.safetensors")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Registry and converted weights go to a per-test folder, never the user's cache; the
    compiled op's build cache stays shared (building it is slow and tested in test_op)."""
    monkeypatch.setenv("DDETR_HOME", str(tmp_path / "ddetr_home"))
    if "DDETR_CACHE" in os.environ:
        monkeypatch.setenv("DDETR_CACHE", os.environ["DDETR_CACHE"])
    # Subprocesses (`python -m ddetr_cli ...`, some run from a temporary cwd) import the package
    # under test, not whatever copy is installed (an editable install may point at another checkout).
    root = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))

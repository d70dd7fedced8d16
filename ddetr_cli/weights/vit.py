"""timm-layout ViT backbone weights (``finetune --backbone-weights``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ddetr_cli.models.vit import CLASSIFIER_KEYS, VisionTransformer
from ddetr_cli.weights.common import WeightsError, load_safetensors, load_state_dict_strict, strip_wrappers, torch_load


def load_timm_vit(vit: VisionTransformer, path: str | Path) -> str:
    """Load timm-layout ViT weights (.safetensors, or a .pth/.pt/.bin state dict, possibly under
    "model"/"state_dict") strictly into ``vit``; returns a note on what was ignored.

    The classifier (``head.*``, ``fc_norm.*``) is dropped; anything else missing, unexpected or
    mis-shaped raises WeightsError naming it.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"backbone weights not found: {p}")
    if p.suffix == ".safetensors":
        sd: object = load_safetensors(p)
    elif p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = torch_load(p)
        for key in ("model", "state_dict"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    else:
        raise WeightsError(f"backbone weights {p}: unknown file type {p.suffix!r}; expected .safetensors, .pth or .bin")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"backbone weights {p} do not hold a tensor state dict")
    sd = strip_wrappers(sd)
    dropped = sorted(k for k in sd if CLASSIFIER_KEYS.match(k))
    load_state_dict_strict(vit, {k: v for k, v in sd.items() if k not in dropped}, source=f"backbone weights {p} (timm ViT)")
    return f"ignored the ImageNet classifier ({', '.join(dropped)})" if dropped else ""

"""Builders for transformers' reference Deformable DETR and DETR with random, perturbed weights.

Used by the parity tests: the project's model must reproduce this one, loaded from the files
transformers itself writes.
"""

from __future__ import annotations

import torch

VARIANT_FLAGS = {
    "single-scale": dict(num_feature_levels=1),
    "single-scale-dc5": dict(num_feature_levels=1, dilation=True),
    "multi-scale": dict(),
    "box-refine": dict(with_box_refine=True),
    "two-stage": dict(with_box_refine=True, two_stage=True),
}

SMALL = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    num_queries=20,
    two_stage_num_proposals=20,
)


def hf_config(variant: str, backbone: str = "resnet50", small: bool = True, num_labels: int = 7):
    from transformers import DeformableDetrConfig

    kw = dict(SMALL) if small else {}
    kw.update(VARIANT_FLAGS[variant])
    id2label = {i: f"class{i}" for i in range(num_labels)}
    return DeformableDetrConfig(
        use_timm_backbone=True,
        backbone=backbone,
        use_pretrained_backbone=False,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        **kw,
    )


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Randomise every parameter and buffer so that no part of the model is at a trivial init.

    Sampling offsets and attention weights get input-dependent weights, so sampling points move
    with the query (at init they are zero and every query samples the same pattern).
    """
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g)
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
        elif name.endswith("running_mean"):
            t.copy_(r * 0.1)
        elif "sampling_offsets" in name:
            # offsets of about 2 feature-map pixels per unit of input (fan-in scaled): points
            # move with the query, without making the float32 model chaotic
            t.add_(r * (2.0 / t.shape[1] ** 0.5 if t.dim() == 2 else 1.0))
        elif "attention_weights" in name:
            t.add_(r * (1.0 / t.shape[1] ** 0.5 if t.dim() == 2 else 0.3))
        elif t.dim() == 4:  # convolutions: He-style scale keeps activations O(1) through 50 layers
            fan_in = t.shape[1] * t.shape[2] * t.shape[3]
            t.copy_(r * (1.0 / fan_in) ** 0.5)
        elif t.dim() == 2:
            t.copy_(r * (1.0 / t.shape[1]) ** 0.5)
        elif name.endswith(".weight") and any(k in name for k in ("norm", "bn", ".gn", "downsample.1", ".1.weight")):
            t.copy_(1.0 + 0.1 * r)
        else:
            t.copy_(0.1 * r)


def make_hf_model(variant: str, seed: int = 0, **cfg_kw):
    from transformers import DeformableDetrForObjectDetection

    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(hf_config(variant, **cfg_kw)).eval()
    perturb_(model, seed)
    return model


DETR_SMALL = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=8,  # the mask head's GroupNorm(8) needs d_model + heads divisible by 8
    decoder_attention_heads=8,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    num_queries=12,
)


def detr_hf_config(backbone: str = "resnet18", num_labels: int = 7, dilation: bool = False, timm: bool = True):
    """A small transformers DetrConfig (random init, offline); ``timm=False`` uses transformers'
    own ResNet (the "no_timm" hub layout) of the same depth."""
    from transformers import DetrConfig, ResNetConfig

    id2label = {i: f"class{i}" for i in range(num_labels)}
    kw = dict(DETR_SMALL, id2label=id2label, label2id={v: k for k, v in id2label.items()}, dilation=dilation,
              use_pretrained_backbone=False)
    if timm:
        return DetrConfig(use_timm_backbone=True, backbone=backbone, **kw)
    depth = int(backbone.removeprefix("resnet"))
    layout = {18: ("basic", [2, 2, 2, 2]), 50: ("bottleneck", [3, 4, 6, 3])}[depth]
    mult = 4 if layout[0] == "bottleneck" else 1
    bc = ResNetConfig(layer_type=layout[0], depths=layout[1], hidden_sizes=[64 * 2**i * mult for i in range(4)],
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    return DetrConfig(use_timm_backbone=False, backbone=None, backbone_config=bc, **kw)


def make_hf_detr(segmentation: bool = False, seed: int = 0, **cfg_kw):
    """transformers DetrForObjectDetection (or DetrForSegmentation) with perturbed random weights."""
    from transformers import DetrForObjectDetection, DetrForSegmentation

    torch.manual_seed(seed)
    cls = DetrForSegmentation if segmentation else DetrForObjectDetection
    model = cls(detr_hf_config(**cfg_kw)).eval()
    perturb_(model, seed)
    return model


def image_batch(sizes=((3, 120, 160), (3, 100, 90)), seed: int = 1):
    """Two differently sized normalised images, zero-padded -> (pixels (2,3,H,W), valid (2,H,W) bool)."""
    g = torch.Generator().manual_seed(seed)
    h = max(s[1] for s in sizes)
    w = max(s[2] for s in sizes)
    pixels = torch.zeros(len(sizes), 3, h, w)
    valid = torch.zeros(len(sizes), h, w, dtype=torch.bool)
    for i, (c, hh, ww) in enumerate(sizes):
        pixels[i, :, :hh, :ww] = torch.randn(c, hh, ww, generator=g)
        valid[i, :hh, :ww] = True
    return pixels, valid


def save_hub(model, folder, safetensors: bool = True) -> None:
    """Write a hub-layout folder (config.json + weights) as transformers does.

    transformers refuses to write safetensors for the box-refine heads (tensors shared between
    ``bbox_embed`` and ``model.decoder.bbox_embed``); the file then keeps one name per tensor,
    as safetensors requires.
    """
    from pathlib import Path

    folder = Path(folder)
    if not safetensors:
        model.save_pretrained(folder, safe_serialization=False)
        return
    try:
        model.save_pretrained(folder)
        return
    except RuntimeError:
        pass
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    seen, sd = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        sd[k] = v.contiguous()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def unresized_image(path):
    """An 800x1000 PNG with a red block on noise, written at ``path``: its short side is the
    reference 800, so transformers' preprocessing and ours leave it at its size. -> path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = (rng.random((800, 1000, 3)) * 255).astype(np.uint8)
    arr[100:400, 200:600] = (230, 40, 40)
    Image.fromarray(arr).save(path)
    return path

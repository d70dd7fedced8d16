"""DETR's checkpoint layouts -> ``detr.DETR`` names and config (``weights.read_weights`` dispatches here).

(a) hub: transformers ``DetrForObjectDetection`` / ``DetrForSegmentation`` (``model_type: detr``;
    the segmentation model nests the detector under ``detr.``), with the backbone either a timm
    ResNet (``use_timm_backbone``, as in facebook/detr-resnet-50) or transformers' own ResNet;
(b) official: facebookresearch/detr torch-hub ``.pth`` (``{"model": state_dict}``, often without
    ``args``: the config then comes from the tensor shapes, and DC5 from the file name).
"""

from __future__ import annotations

import argparse
import re

import torch

from ddetr_cli.formats.labels import coco_class_names, coco_panoptic_class_names
from ddetr_cli.models.backbone import RESNET_LAYOUTS
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.weights.common import WeightsError, hub_class_names, hub_to_own

_ENC = r"^model\.encoder\.layers\.(\d+)\."
_DEC = r"^model\.decoder\.layers\.(\d+)\."

DETR_HUB_RULES: list[tuple[str, str]] = [
    (r"^model\.backbone\.conv_encoder\.model\.", "backbone.body."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (_ENC + r"self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (_ENC + r"final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (_ENC + r"fc([12])\.", r"transformer.encoder.layers.\1.linear\2."),
    (_ENC + r"self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (_DEC + r"self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (_DEC + r"encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (_DEC + r"final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (_DEC + r"fc([12])\.", r"transformer.decoder.layers.\1.linear\2."),
    (_DEC + r"encoder_attn\.", r"transformer.decoder.layers.\1.multihead_attn."),
    (_DEC + r"self_attn\.", r"transformer.decoder.layers.\1.self_attn."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
]

# transformers' own ResNet (use_timm_backbone=false) -> torchvision/timm names of backbone.ResNet
_HF_RESNET_RULES: list[tuple[str, str]] = [
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.", "layer{s}.{b}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.", "layer{s}.{b}.downsample.1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.", "layer{s}.{b}.conv{c}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.", "layer{s}.{b}.bn{c}."),
]

_BODY = "backbone.body."


def _hf_resnet_key(key: str) -> str:
    """A key under backbone.body. in transformers-ResNet naming -> ResNet naming (others unchanged)."""
    if not key.startswith(_BODY):
        return key
    rest = key[len(_BODY):]
    for pat, rep in _HF_RESNET_RULES:
        m = re.match(pat, rest)
        if m:
            g = [int(x) for x in m.groups()]
            fields = {"s": g[0] + 1, "b": g[1], "c": g[2] + 1} if len(g) == 3 else ({"s": g[0] + 1, "b": g[1]} if g else {})
            return _BODY + rep.format(**fields) + rest[m.end():]
    return key


def _depth_from_layout(kind: str, blocks: tuple[int, ...]) -> int:
    for depth, layout in RESNET_LAYOUTS.items():
        if layout == (kind, tuple(blocks)):
            return depth
    raise WeightsError(f"unsupported ResNet layout ({kind} blocks {list(blocks)}); supported: ResNet-18/34/50/101")


def _hub_backbone(cfg: dict) -> tuple[int, int, bool]:
    """A DetrConfig dict -> (ResNet depth, stem width, dilation)."""
    if cfg.get("use_timm_backbone", True):
        backbone = str(cfg.get("backbone", "resnet50"))
        m = re.fullmatch(r"resnet(18|34|50|101)", backbone)
        if not m:
            raise WeightsError(f"unsupported backbone {backbone!r}; supported: resnet18/34/50/101")
        return int(m.group(1)), 64, bool(cfg.get("dilation", False))
    bc = cfg.get("backbone_config") or {}
    if bc.get("model_type") != "resnet":
        raise WeightsError(f"unsupported transformers backbone {bc.get('model_type')!r}; supported: resnet")
    kind = "bottleneck" if bc.get("layer_type", "bottleneck") == "bottleneck" else "basic"
    depth = _depth_from_layout(kind, tuple(bc.get("depths", (3, 4, 6, 3))))
    width = int(bc.get("embedding_size", 64))
    expected = [width * 2**i * (4 if kind == "bottleneck" else 1) for i in range(4)]
    if list(bc.get("hidden_sizes", expected)) != expected or bc.get("downsample_in_bottleneck", False):
        raise WeightsError("unsupported transformers ResNet (non-standard widths or stride in the 1x1 conv)")
    return depth, width, False  # transformers applies `dilation` to timm backbones only


def config_from_detr_hub(cfg: dict, masks: bool) -> ModelConfig:
    """transformers DetrConfig dict -> ModelConfig (arch "detr")."""
    if cfg.get("position_embedding_type", "sine") != "sine":
        raise WeightsError(f"unsupported position embedding {cfg.get('position_embedding_type')!r}; supported: sine")
    if cfg.get("activation_function", "relu") != "relu":
        raise WeightsError(f"unsupported activation {cfg.get('activation_function')!r}; supported: relu")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if cfg.get(enc, 8) != cfg.get(dec, cfg.get(enc, 8)):
            raise WeightsError(f"{enc} != {dec} is not supported")
    depth, width, dilation = _hub_backbone(cfg)
    num_classes, names = hub_class_names(cfg)
    return ModelConfig(
        arch="detr", masks=masks, num_classes=num_classes,
        class_names=names if any(names) else (_official_names(num_classes) if masks else []),
        backbone_depth=depth, backbone_width=width, dilation=dilation, num_feature_levels=1,
        d_model=int(cfg.get("d_model", 256)), nheads=int(cfg.get("encoder_attention_heads", 8)),
        enc_layers=int(cfg.get("encoder_layers", 6)), dec_layers=int(cfg.get("decoder_layers", 6)),
        dim_feedforward=int(cfg.get("encoder_ffn_dim", 2048)), dropout=float(cfg.get("dropout", 0.1)),
        num_queries=int(cfg.get("num_queries", 100)),
    )


def read_detr_hub(hub_cfg: dict, raw: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A hub folder's config.json dict and state dict -> (config, state dict in DETR names)."""
    masks = any(k.startswith(("detr.", "bbox_attention.", "mask_head.")) for k in raw)
    raw = {re.sub(r"^detr\.", "", k): v for k, v in raw.items()}
    sd = {_hf_resnet_key(k): v for k, v in hub_to_own(raw, DETR_HUB_RULES).items()}
    try:
        return config_from_detr_hub(hub_cfg, masks), sd
    except ValueError as e:  # ModelConfig validation
        raise WeightsError(f"unsupported DETR config ({e})") from None


def _official_names(num_classes: int) -> list[str]:
    """The published checkpoints hold no names: 91 slots are COCO detection's table, 250 slots
    (the panoptic models) COCO panoptic's; other counts stay unnamed."""
    return {91: coco_class_names(91), 250: coco_panoptic_class_names(250)}.get(num_classes, [])


def is_detr_official(sd: dict[str, torch.Tensor]) -> bool:
    """Whether an official-layout state dict is DETR's (it has nn.MultiheadAttention cross-attention)."""
    return any(re.match(r"^(detr\.)?transformer\.decoder\.layers\.\d+\.multihead_attn\.", k) for k in sd)


def read_detr_official(args: object, sd: dict[str, torch.Tensor], filename: str = "") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """facebookresearch/detr state dict (+ optional ``args``) -> (config, state dict in DETR names).

    Shapes give everything but the head count (``args.nheads``, else 8) and DC5 (``args.dilation``,
    else "dc5" in the file name, as the published files are named: detr-r50-dc5-f0fb7ef5.pth).
    """
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    sd = {re.sub(r"^backbone\.0\.body\.", _BODY, re.sub(r"^detr\.", "", k)): v for k, v in sd.items()}
    if "class_embed.weight" not in sd or "query_embed.weight" not in sd:
        raise WeightsError("checkpoint has no class_embed.weight / query_embed.weight: not a DETR detection checkpoint")
    kind = "bottleneck" if f"{_BODY}layer1.0.conv3.weight" in sd else "basic"
    blocks = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"{_BODY}layer{i}.")}) for i in range(1, 5))
    num_classes = sd["class_embed.weight"].shape[0] - 1
    layers = lambda part: len({k.split(".")[3] for k in sd if k.startswith(f"transformer.{part}.layers.")})  # noqa: E731
    try:
        cfg = ModelConfig(
            arch="detr", masks="bbox_attention.q_linear.weight" in sd, num_classes=num_classes,
            class_names=_official_names(num_classes),
            backbone_depth=_depth_from_layout(kind, blocks), backbone_width=sd[f"{_BODY}conv1.weight"].shape[0],
            dilation=bool(a.get("dilation", "dc5" in filename.lower())), num_feature_levels=1,
            d_model=sd["class_embed.weight"].shape[1], nheads=int(a.get("nheads", 8)),
            enc_layers=layers("encoder"), dec_layers=layers("decoder"),
            dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0]
            if "transformer.encoder.layers.0.linear1.weight" in sd else int(a.get("dim_feedforward", 2048)),
            dropout=float(a.get("dropout", 0.1)), num_queries=sd["query_embed.weight"].shape[0],
        )
    except (ValueError, KeyError) as e:
        raise WeightsError(f"unsupported DETR checkpoint ({e})") from None
    return cfg, sd

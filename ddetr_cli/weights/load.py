"""Reading and writing Deformable DETR and DETR weights in three layouts (DETR's renaming
tables live in ``weights/detr.py``; what the layouts share in ``weights/common.py``).

(a) ``hub``: a transformers/hub directory (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``), parameter names of transformers 4.x;
(b) ``official``: a ``.pth`` of fundamentalvision/Deformable-DETR (``{"model", "args", ...}``),
    read with ``weights_only=True`` and only ``argparse.Namespace`` allowed;
(c) ``ddetr``: this project's single file, a ``.safetensors`` whose metadata holds the JSON
    model config (variant, classes, class names). A mask-head add-on (``save_mask_head``) is
    such a file holding only a mask head, with the name of the detector file beside it that it
    completes (``ddetr_base``): reading it reads both.

Every layout is renamed to the model's own parameter names and loaded strictly: missing or
unexpected keys raise :class:`WeightsError` naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from ddetr_cli.files import atomic_path
from ddetr_cli.formats.labels import coco_class_names
from ddetr_cli.models.build import build_model
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.masks import MASK_HEAD_PREFIXES
from ddetr_cli.weights.common import (
    WeightsError,
    alias_groups,
    hub_class_names,
    hub_to_own,
    load_safetensors,
    load_state_dict_strict,
    safetensors_metadata,
    strip_wrappers,
    torch_load,
)

FORMAT_KEY = "ddetr_config"
FORMAT_VERSION = "1"
BASE_KEY = "ddetr_base"  # a mask-head add-on: the detector file (beside it) it completes


def detect_layout(path: str | Path) -> str:
    """Return "hub", "official" or "ddetr" for a weights path, or raise WeightsError."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"weights not found: {p}")
    if p.is_dir():
        if (p / "config.json").is_file() and ((p / "model.safetensors").is_file() or (p / "pytorch_model.bin").is_file()):
            return "hub"
        raise WeightsError(f"{p} is a folder but not a transformers/hub model (needs config.json and model.safetensors or "
                           f"pytorch_model.bin)")
    if p.suffix == ".safetensors":
        meta = safetensors_metadata(p)
        if FORMAT_KEY in meta:
            return "ddetr"
        if (p.parent / "config.json").is_file():
            return "hub"
        raise WeightsError(f"{p} is a safetensors file without a ddetr config and no config.json beside it")
    if p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        if p.name == "pytorch_model.bin" and (p.parent / "config.json").is_file():
            return "hub"
        return "official"
    raise WeightsError(f"unknown weights file type {p.suffix!r} ({p}); expected a hub folder, .pth or .safetensors")


_HUB_RULES: list[tuple[str, str]] = [
    (r"^model\.backbone\.conv_encoder\.model\.", "backbone.body."),
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.", r"transformer.\1."),
    (r"^model\.decoder\.(bbox_embed|class_embed)\.", r"transformer.decoder.\1."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"^model\.encoder\.layers\.(\d+)\.fc([12])\.", r"transformer.encoder.layers.\1.linear\2."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"^model\.decoder\.layers\.(\d+)\.fc([12])\.", r"transformer.decoder.layers.\1.linear\2."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.", r"transformer.decoder.layers.\1.self_attn."),
]


def official_to_own(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"^backbone\.0\.body\.", "backbone.body.", k): v for k, v in sd.items()}


def config_from_hub(cfg: dict) -> ModelConfig:
    """transformers DeformableDetrConfig dict -> ModelConfig."""
    if not cfg.get("use_timm_backbone", True) or cfg.get("backbone_config"):
        raise WeightsError("only hub models with a timm ResNet backbone (use_timm_backbone=true) are supported")
    backbone = str(cfg.get("backbone", "resnet50"))
    m = re.fullmatch(r"resnet(18|34|50|101)", backbone)
    if not m:
        raise WeightsError(f"unsupported backbone {backbone!r}; supported: resnet18/34/50/101")
    num_classes, names = hub_class_names(cfg)
    two_stage = bool(cfg.get("two_stage", False))
    num_queries = int(cfg.get("two_stage_num_proposals", 300) if two_stage else cfg.get("num_queries", 300))
    return ModelConfig(
        num_classes=num_classes,
        class_names=names if any(names) else [],
        backbone_depth=int(m.group(1)),
        dilation=bool(cfg.get("dilation", False)),
        num_feature_levels=int(cfg.get("num_feature_levels", 4)),
        d_model=int(cfg.get("d_model", 256)),
        nheads=int(cfg.get("encoder_attention_heads", 8)),
        enc_layers=int(cfg.get("encoder_layers", 6)),
        dec_layers=int(cfg.get("decoder_layers", 6)),
        dim_feedforward=int(cfg.get("encoder_ffn_dim", 1024)),
        dropout=float(cfg.get("dropout", 0.1)),
        enc_n_points=int(cfg.get("encoder_n_points", 4)),
        dec_n_points=int(cfg.get("decoder_n_points", 4)),
        num_queries=num_queries,
        with_box_refine=bool(cfg.get("with_box_refine", False)),
        two_stage=two_stage,
    )


def config_from_official(args: object, sd: dict[str, torch.Tensor]) -> ModelConfig:
    """Official ``args`` (Namespace or dict) plus the state dict's shapes -> ModelConfig."""
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    if "class_embed.0.weight" not in sd:
        raise WeightsError("checkpoint has no class_embed.0.weight: not a Deformable DETR detection checkpoint")
    num_classes = sd["class_embed.0.weight"].shape[0]
    d_model = sd["class_embed.0.weight"].shape[1]
    levels = sd["transformer.level_embed"].shape[0] if "transformer.level_embed" in sd else int(a.get("num_feature_levels", 4))
    enc_layers = len({k.split(".")[3] for k in sd if k.startswith("transformer.encoder.layers.")})
    dec_layers = len({k.split(".")[3] for k in sd if k.startswith("transformer.decoder.layers.")})
    depth = int(re.sub(r"\D", "", str(a.get("backbone", "resnet50"))) or 50)
    two_stage = bool(a.get("two_stage", "transformer.enc_output.weight" in sd))
    refine = bool(a.get("with_box_refine", "transformer.decoder.bbox_embed.0.layers.0.weight" in sd))
    nq = sd["query_embed.weight"].shape[0] if "query_embed.weight" in sd else int(a.get("num_queries", 300))
    return ModelConfig(
        num_classes=num_classes,
        class_names=coco_class_names(num_classes) if num_classes == 91 else [],
        backbone_depth=depth,
        dilation=bool(a.get("dilation", False)),
        num_feature_levels=levels,
        d_model=d_model,
        nheads=int(a.get("nheads", 8)),
        enc_layers=enc_layers or int(a.get("enc_layers", 6)),
        dec_layers=dec_layers or int(a.get("dec_layers", 6)),
        dim_feedforward=int(a.get("dim_feedforward", 1024)),
        dropout=float(a.get("dropout", 0.1)),
        enc_n_points=int(a.get("enc_n_points", 4)),
        dec_n_points=int(a.get("dec_n_points", 4)),
        num_queries=nq,
        with_box_refine=refine,
        two_stage=two_stage,
    )


# ---------------------------------------------------------------------------------------------
# strict loading with shared heads


def read_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """Read any supported layout -> (config, state dict in model names, layout)."""
    p = Path(path)
    layout = detect_layout(p)
    if layout == "ddetr":
        meta = safetensors_metadata(p)
        try:
            cfg = ModelConfig.from_dict(json.loads(meta[FORMAT_KEY]))
        except (ValueError, TypeError) as e:
            raise WeightsError(f"{p}: bad ddetr config in metadata ({e})") from None
        if BASE_KEY in meta:
            return _with_base(p, cfg, meta[BASE_KEY]) + (layout,)
        return cfg, load_safetensors(p), layout
    if layout == "hub":
        d = p if p.is_dir() else p.parent
        try:
            hub_cfg = json.loads((d / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise WeightsError(f"{d / 'config.json'} is not valid JSON ({e})") from None
        model_type = hub_cfg.get("model_type", "deformable_detr")
        if model_type not in ("deformable_detr", "detr"):
            raise WeightsError(f"{d} holds a {model_type!r} model, not deformable_detr or detr")
        st = d / "model.safetensors"
        if st.is_file():
            raw = load_safetensors(st)
        else:
            raw = torch_load(d / "pytorch_model.bin")
            if not isinstance(raw, dict):
                raise WeightsError(f"{d / 'pytorch_model.bin'} does not hold a state dict")
        raw = strip_wrappers(raw)
        if model_type == "detr":
            from ddetr_cli.weights.detr import read_detr_hub

            cfg, sd = read_detr_hub(hub_cfg, raw)
            return cfg, sd, layout
        return config_from_hub(hub_cfg), hub_to_own(raw, _HUB_RULES), layout
    ckpt = torch_load(p)
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{p} does not hold a checkpoint dict")
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{p} has no tensor state dict under 'model'")
    sd = strip_wrappers(sd)
    if any(k.startswith(("model.backbone.conv_encoder", "detr.model.backbone.conv_encoder")) for k in sd):
        raise WeightsError(f"{p} holds transformers-layout weights: put it in a folder with its config.json")
    from ddetr_cli.weights.detr import is_detr_official, read_detr_official

    if is_detr_official(sd):
        cfg, sd = read_detr_official(ckpt.get("args"), sd, p.name)
        return cfg, sd, layout
    sd = official_to_own(sd)
    return config_from_official(ckpt.get("args"), sd), sd, layout


# model-card fields of a detector that its mask-head add-on takes from it (the boxes and scores
# are the detector's, so are the tracking thresholds measured on them)
CARD_FIELDS = ("track_high", "track_low")


def _with_base(p: Path, cfg: ModelConfig, base_name: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A mask-head add-on's (config, tensors) completed by its base detector's: the file
    ``base_name`` beside it, whose config must be the add-on's without the mask head (model-card
    fields aside, which come from the base, and the head's own ``mask_attention``)."""
    base = p.parent / base_name
    if Path(base_name).name != base_name or not base.is_file():
        raise WeightsError(f"{p} is a mask head for {base_name}, which is not beside it")
    base_cfg, base_sd, base_layout = read_weights(base)
    cfg = dataclasses.replace(cfg, **{f: getattr(base_cfg, f) for f in CARD_FIELDS})
    if base_layout != "ddetr" or dataclasses.replace(base_cfg, masks=True, mask_attention=cfg.mask_attention) != cfg:
        raise WeightsError(f"{p} is a mask head for another model than {base}: their configs differ")
    head = load_safetensors(p)
    if not head or not all(k.startswith(MASK_HEAD_PREFIXES) for k in head):
        raise WeightsError(f"{p} holds tensors other than a mask head ({BASE_KEY} files hold the head only)")
    return cfg, {**base_sd, **head}


def save_mask_head(model: torch.nn.Module, path: str | Path, base: str | Path) -> Path:
    """Write only the mask head of ``model`` (a detector with ``cfg.masks``) as an add-on to the
    ddetr-layout detector file ``base``, which must hold the rest of ``model`` and stay beside
    ``path`` (the add-on records its file name). A few MB instead of the whole model again."""
    from safetensors.torch import save_file

    base = Path(base)
    base_cfg, base_sd, _ = read_weights(base)
    # fine-tuning records the dataset's category ids and its --imgsz, and leaves out the starting
    # model's measured tracking thresholds: the same labels (ids and names) are the same model, and
    # with the detector bit-identical (checked below) its thresholds still hold; the add-on then
    # keeps the base's config, plus the head
    same = dataclasses.replace(model.cfg, masks=False, mask_attention=base_cfg.mask_attention, category_ids=base_cfg.category_ids,
                               stuff_ids=base_cfg.stuff_ids, imgsz=base_cfg.imgsz,
                               track_high=base_cfg.track_high, track_low=base_cfg.track_low) == base_cfg
    if not model.cfg.masks or not same or list(model.cfg.labels) != list(base_cfg.labels):
        raise WeightsError(f"{base} is not this model without its mask head (the configs differ)")
    sd = canonical_state_dict(model)
    changed = [k for k, v in base_sd.items() if k in sd and not torch.equal(sd[k], v)]
    if changed:
        raise WeightsError(f"the model's detector differs from {base} ({len(changed)} tensors, e.g. {changed[0]}): "
                           f"save the whole model instead")
    p = Path(path)
    if p.resolve().parent != base.resolve().parent:
        raise WeightsError(f"a mask-head add-on must sit beside its base ({base.parent})")
    cfg = dataclasses.replace(base_cfg, masks=True, mask_attention=model.cfg.mask_attention)
    meta = {FORMAT_KEY: json.dumps(cfg.to_dict()), "ddetr_format_version": FORMAT_VERSION, BASE_KEY: base.name}
    with atomic_path(p) as tmp:
        save_file({k: v for k, v in sd.items() if k.startswith(MASK_HEAD_PREFIXES)}, str(tmp), metadata=meta)
    return p


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model described by a weights file/folder and load it strictly, in eval mode."""
    cfg, sd, layout = read_weights(path)
    model = build_model(cfg)
    load_state_dict_strict(model, sd, source=f"{path} ({layout} layout)")
    return model.to(device).eval()


def canonical_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with one name per tensor (shared heads once), contiguous, on CPU."""
    own = model.state_dict()
    return {k: own[k].detach().cpu().contiguous() for k in alias_groups(model)}


def save_model(model: torch.nn.Module, path: str | Path, extra_meta: dict[str, str] | None = None) -> Path:
    """Write the project's own format atomically: a .safetensors with the config in its metadata."""
    from safetensors.torch import save_file

    if model.inference_only:
        raise ValueError("this model was optimised for inference (BN folded); save it before optimize_for_inference()")
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_suffix(p.suffix + ".safetensors") if p.suffix else p.with_suffix(".safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {FORMAT_KEY: json.dumps(model.cfg.to_dict()), "ddetr_format_version": FORMAT_VERSION, **(extra_meta or {})}
    with atomic_path(p) as tmp:
        save_file(canonical_state_dict(model), str(tmp), metadata=meta)
    return p


def update_config(path: str | Path, **fields: Any) -> Path:
    """Set model config fields (e.g. ``track_high=0.5``) in a ddetr ``.safetensors`` file's
    metadata without touching its tensors: the JSON header is rewritten and the data section
    after it is copied byte for byte (the offsets in the header are relative to it). The new
    config is validated (``ModelConfig``) before the file is replaced, atomically."""
    p = Path(path)
    if detect_layout(p) != "ddetr":
        raise WeightsError(f"{p}: only ddetr .safetensors files carry a model config to update")
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    meta = header["__metadata__"]
    cfg = {**json.loads(meta[FORMAT_KEY]), **fields}
    ModelConfig.from_dict(cfg)  # unknown keys or bad values fail here, before anything is written
    meta[FORMAT_KEY] = json.dumps(cfg)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    with atomic_path(p) as tmp:
        tmp.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return p

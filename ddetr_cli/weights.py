"""Reading and writing Deformable DETR and DETR weights in three layouts (DETR's renaming
tables live in ``detr_weights.py``).

(a) ``hub``: a transformers/hub directory (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``), parameter names of transformers 4.x;
(b) ``official``: a ``.pth`` of fundamentalvision/Deformable-DETR (``{"model", "args", ...}``),
    read with ``weights_only=True`` and only ``argparse.Namespace`` allowed;
(c) ``ddetr``: this project's single file, a ``.safetensors`` whose metadata holds the JSON
    model config (variant, classes, class names).

Every layout is renamed to the model's own parameter names and loaded strictly: missing or
unexpected keys raise :class:`WeightsError` naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from .labels import coco_class_names, is_placeholder
from .config import ModelConfig
from .model import build_model

FORMAT_KEY = "ddetr_config"
FORMAT_VERSION = "1"


class WeightsError(ValueError):
    """A weights file that cannot be used; the message is one line meant for the user."""


# ---------------------------------------------------------------------------------------------
# layout detection


def detect_layout(path: str | Path) -> str:
    """Return "hub", "official" or "ddetr" for a weights path, or raise WeightsError."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"weights not found: {p}")
    if p.is_dir():
        if (p / "config.json").is_file() and ((p / "model.safetensors").is_file() or (p / "pytorch_model.bin").is_file()):
            return "hub"
        raise WeightsError(f"{p} is a folder but not a transformers/hub model (needs config.json and model.safetensors or pytorch_model.bin)")
    if p.suffix == ".safetensors":
        meta = _safetensors_metadata(p)
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


def _safetensors_metadata(p: Path) -> dict[str, str]:
    # The header is an 8-byte little-endian length followed by JSON: read it without loading tensors.
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        return header.get("__metadata__") or {}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{p} is not a readable safetensors file ({e})") from None


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types for truncation/corruption
        raise WeightsError(f"{p} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def _torch_load(p: Path) -> object:
    """torch.load with weights_only=True, allowing argparse.Namespace (official ``args``)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines()]
        code = next((ln for ln in lines if "GLOBAL" in ln), None)
        if code:
            raise WeightsError(
                f"refusing to load {p}: the pickle asks for code that weights-only loading does not allow ({code})"
            ) from None
        raise WeightsError(f"{p} is corrupt, truncated or not a PyTorch checkpoint ({lines[0] if lines else 'unpickling failed'})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{p} is corrupt, truncated or not a PyTorch checkpoint ({msg})") from None


# ---------------------------------------------------------------------------------------------
# renaming


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


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    return key


def hub_to_own(sd: dict[str, torch.Tensor], rules: list[tuple[str, str]] | None = None) -> dict[str, torch.Tensor]:
    """transformers 4.x names -> model names (``rules``: Deformable DETR's by default); separate
    q/k/v projections of an attention are packed into its ``in_proj``."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        k = _rename(k, _HUB_RULES if rules is None else rules)
        m = re.match(r"^(transformer\.(?:en|de)coder\.layers\.\d+\.\w+)\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            qkv.setdefault(f"{m.group(1)}.in_proj_{m.group(3)}", {})[m.group(2)] = v
        else:
            out[k] = v
    for k, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(f"incomplete attention projection {k}: has only {sorted(parts)}")
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def official_to_own(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"^backbone\.0\.body\.", "backbone.body.", k): v for k, v in sd.items()}


def _strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP and torch.compile prefixes, and counters frozen BN does not keep.
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(module\.|_orig_mod\.)+", "", k)
        if k.endswith("num_batches_tracked"):
            continue
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# configs


def hub_class_names(cfg: dict) -> tuple[int, list[str]]:
    """A hub config's (class count, names); placeholder names ("N/A", "LABEL_3") become ""."""
    id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()}
    num_classes = cfg.get("num_labels") or (max(id2label) + 1 if id2label else 91)
    names = [id2label.get(i, "") for i in range(num_classes)]
    return num_classes, ["" if is_placeholder(n, i) else n for i, n in enumerate(names)]


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


def alias_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Canonical name -> every state-dict name of the same tensor (heads are shared between
    ``class_embed.K``, ``transformer.decoder.class_embed.K`` and, without refinement, all K)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return {names[0]: names for names in groups.values()}


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``sd`` (model names) into ``model``; any missing, unexpected or mis-shaped tensor is an error.

    A checkpoint may hold any one or several of the names of a shared tensor.
    """
    groups = alias_groups(model)
    owner = {alias: canon for canon, names in groups.items() for alias in names}
    unexpected = sorted(k for k in sd if k not in owner)
    present = {owner[k] for k in sd if k in owner}
    missing = sorted(set(groups) - present)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_abbrev(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_abbrev(unexpected)})")
        raise WeightsError(f"{source} does not match the model: " + "; ".join(parts))
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in sd.items():
            target = own[k]
            if target.shape != v.shape:
                raise WeightsError(
                    f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(target.shape)}"
                    + (" (class-count mismatch)" if "class_embed" in k else "")
                )
            target.copy_(v)


def _abbrev(names: Iterable[str], n: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... +{len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# public API


def read_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """Read any supported layout -> (config, state dict in model names, layout)."""
    p = Path(path)
    layout = detect_layout(p)
    if layout == "ddetr":
        meta = _safetensors_metadata(p)
        try:
            cfg = ModelConfig.from_dict(json.loads(meta[FORMAT_KEY]))
        except (ValueError, TypeError) as e:
            raise WeightsError(f"{p}: bad ddetr config in metadata ({e})") from None
        return cfg, _load_safetensors(p), layout
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
            raw = _load_safetensors(st)
        else:
            raw = _torch_load(d / "pytorch_model.bin")
            if not isinstance(raw, dict):
                raise WeightsError(f"{d / 'pytorch_model.bin'} does not hold a state dict")
        raw = _strip_wrappers(raw)
        if model_type == "detr":
            from .detr_weights import read_detr_hub

            cfg, sd = read_detr_hub(hub_cfg, raw)
            return cfg, sd, layout
        return config_from_hub(hub_cfg), hub_to_own(raw), layout
    ckpt = _torch_load(p)
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{p} does not hold a checkpoint dict")
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{p} has no tensor state dict under 'model'")
    sd = _strip_wrappers(sd)
    if any(k.startswith(("model.backbone.conv_encoder", "detr.model.backbone.conv_encoder")) for k in sd):
        raise WeightsError(f"{p} holds transformers-layout weights: put it in a folder with its config.json")
    from .detr_weights import is_detr_official, read_detr_official

    if is_detr_official(sd):
        cfg, sd = read_detr_official(ckpt.get("args"), sd, p.name)
        return cfg, sd, layout
    sd = official_to_own(sd)
    return config_from_official(ckpt.get("args"), sd), sd, layout


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
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(canonical_state_dict(model), tmp, metadata=meta)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p

"""What every weights layout shares: the one-line error type, safe file readers (safetensors,
weights-only ``torch.load``), key renaming, hub label names and strict loading."""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ddetr_cli.formats.labels import is_placeholder
from ddetr_cli.models.masks import MASK_HEAD_PREFIXES


class WeightsError(ValueError):
    """A weights file that cannot be used; the message is one line meant for the user."""


# ---------------------------------------------------------------------------------------------
# layout detection


def safetensors_metadata(p: Path) -> dict[str, str]:
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


def load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types for truncation/corruption
        raise WeightsError(f"{p} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def torch_load(p: Path) -> object:
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
        first = lines[0] if lines else "unpickling failed"
        raise WeightsError(f"{p} is corrupt, truncated or not a PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{p} is corrupt, truncated or not a PyTorch checkpoint ({msg})") from None


# ---------------------------------------------------------------------------------------------
# renaming


def rename_key(key: str, rules: list[tuple[str, str]]) -> str:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    return key


def hub_to_own(sd: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """transformers 4.x names -> model names by ``rules`` (regex, replacement; the first match
    wins); separate q/k/v projections of an attention are packed into its ``in_proj``."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        k = rename_key(k, rules)
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


def strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def alias_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Canonical name -> every state-dict name of the same tensor (heads are shared between
    ``class_embed.K``, ``transformer.decoder.class_embed.K`` and, without refinement, all K)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return {names[0]: names for names in groups.values()}


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint",
                           new_mask_head: bool = False) -> None:
    """Load ``sd`` (model names) into ``model``; any missing, unexpected or mis-shaped tensor is an error.

    A checkpoint may hold any one or several of the names of a shared tensor. ``new_mask_head``:
    a detector's weights going into the same model with a mask head added (``cfg.masks``): the
    head's tensors (``models.masks.MASK_HEAD_PREFIXES``) must then all be missing, and keep their
    fresh initialisation; anything else missing is still an error.
    """
    groups = alias_groups(model)
    owner = {alias: canon for canon, names in groups.items() for alias in names}
    unexpected = sorted(k for k in sd if k not in owner)
    present = {owner[k] for k in sd if k in owner}
    missing = sorted(set(groups) - present)
    if new_mask_head:
        head = {k for k in groups if k.startswith(MASK_HEAD_PREFIXES)}
        if not head:
            raise WeightsError(f"{source}: the model has no mask head to add")
        if head & present:
            raise WeightsError(f"{source} already holds a mask head: load it as it is")
        missing = [k for k in missing if k not in head]
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



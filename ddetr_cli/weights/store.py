"""Named weights: the bundled demo model, the published hub models and imported files.

A name resolves to a local weights path in one of the layouts ``weights/load.py`` reads. Hub models
are pulled through huggingface-hub (its cache, resume and ``HF_HUB_OFFLINE``) and converted once
to the project's own format in ``$DDETR_HOME/models/`` (default ``~/.cache/ddetr``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ddetr_cli.assets import asset_dir
from ddetr_cli.files import atomic_write_text, home

# the bundled models: the installed package data (ddetr_cli/assets/weights) or the checkout's weights/
WEIGHTS_DIR = asset_dir("weights")
DEFAULT_MODEL = "deformable-detr"

# name -> (hub repo id, description)
HUB_MODELS: dict[str, tuple[str, str]] = {
    "deformable-detr": ("SenseTime/deformable-detr", "multi-scale R50, COCO 44.5 AP"),
    "deformable-detr-box-refine": ("SenseTime/deformable-detr-with-box-refine", "+ iterative box refinement, COCO 46.2 AP"),
    "deformable-detr-two-stage": ("SenseTime/deformable-detr-with-box-refine-two-stage", "++ two-stage, COCO 46.9 AP"),
    "deformable-detr-single-scale": ("SenseTime/deformable-detr-single-scale", "single-scale R50, COCO 39.4 AP"),
    "deformable-detr-single-scale-dc5": ("SenseTime/deformable-detr-single-scale-dc5", "single-scale DC5 R50, COCO 41.5 AP"),
    "detr-resnet-50": ("facebook/detr-resnet-50", "DETR R50, COCO 42.0 AP"),
    "detr-resnet-101": ("facebook/detr-resnet-101", "DETR R101, COCO 43.5 AP"),
    "detr-resnet-50-dc5": ("facebook/detr-resnet-50-dc5", "DETR DC5 R50, COCO 43.3 AP"),
    "detr-resnet-101-dc5": ("facebook/detr-resnet-101-dc5", "DETR DC5 R101, COCO 44.9 AP"),
    "detr-resnet-50-panoptic": ("facebook/detr-resnet-50-panoptic", "DETR R50 + mask head, COCO panoptic 43.4 PQ"),
}


class ModelNotAvailable(LookupError):
    """A model name that cannot be turned into local weights; the message says what to do."""


@dataclass
class Entry:
    name: str
    path: str
    source: str  # "bundled", "hub:<repo>", "import", "finetune"
    description: str = ""
    created: float = 0.0


def _index_path() -> Path:
    return home() / "registry.json"


def _read_index() -> dict[str, dict]:
    p = _index_path()
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _write_index(index: dict[str, dict]) -> None:
    atomic_write_text(_index_path(), json.dumps(index, indent=2, sort_keys=True))


def _bundled() -> dict[str, Entry]:
    out = {}
    for f in sorted(WEIGHTS_DIR.glob("*.safetensors")):
        card = f.with_suffix(".md")
        desc = card.read_text().splitlines()[0].lstrip("# ").strip() if card.is_file() else "bundled"
        out[f.stem] = Entry(f.stem, str(f), "bundled", desc)
    return out


def list_models() -> list[Entry]:
    """Every known name: bundled, registered (imported/finetuned/pulled) and pullable hub models."""
    entries: dict[str, Entry] = dict(_bundled())
    for name, d in _read_index().items():
        entries[name] = Entry(**d)
    for name, (repo, desc) in HUB_MODELS.items():
        entries.setdefault(name, Entry(name, "", f"hub:{repo}", desc))
    return sorted(entries.values(), key=lambda e: (e.source != "bundled", e.name))


class ModelNameError(ValueError):
    """A name that cannot be registered (malformed, reserved, or taken without ``force``)."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str, force: bool = False, reserved: bool = True) -> str:
    """``name`` if it can be registered: letters, digits, ``. _ -`` (no paths), not a bundled or
    hub name (``reserved``; a hub pull registers its own name), and not registered already unless
    ``force`` (re-point it). Else ModelNameError."""
    if not _NAME.fullmatch(name or "") or ".." in name:
        raise ModelNameError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (no paths)")
    if reserved and (name in _bundled() or name in HUB_MODELS):
        raise ModelNameError(f"{name!r} is a bundled or hub model name; choose another")
    taken = _read_index().get(name)
    if taken is not None and not force:
        raise ModelNameError(f"{name!r} is already registered ({taken.get('path')}); "
                             "choose another name or re-point it with --force")
    return name


def unique_name(base: str) -> str:
    """``base``, else ``base-2``, ``base-3``, ...: the first name not taken (for default names)."""
    taken = set(_read_index()) | set(_bundled()) | set(HUB_MODELS)
    base = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip(".-_") or "model"
    n, name = 1, base
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def register(name: str, path: str | Path, source: str = "import", description: str = "",
             force: bool = False) -> Entry:
    """Record ``name`` -> ``path`` (a weights file/folder any loader reads); an existing name is
    re-pointed only with ``force`` (ModelNameError otherwise). A hub pull registers the hub's
    own name (``source`` "hub:...") and may refresh it."""
    hub = source.startswith("hub:")
    check_name(name, force or hub, reserved=not hub)
    entry = Entry(name, str(Path(path).resolve()), source, description, time.time())
    index = _read_index()
    index[name] = asdict(entry)
    _write_index(index)
    return entry


def unregister(name: str) -> Entry:
    index = _read_index()
    if name not in index:
        raise ModelNotAvailable(f"no registered model named {name!r} (bundled and hub names cannot be removed)")
    entry = Entry(**index.pop(name))
    _write_index(index)
    return entry


def get(name: str) -> Entry | None:
    return next((e for e in list_models() if e.name == name), None)


def pull(name: str) -> Path:
    """Download a hub model (huggingface-hub cache), convert it once to the project format."""
    from huggingface_hub import snapshot_download

    from ddetr_cli.weights.load import load_model, save_model

    if name not in HUB_MODELS:
        raise ModelNotAvailable(f"{name!r} is not a hub model; known: {', '.join(HUB_MODELS)}")
    repo = HUB_MODELS[name][0]
    try:
        folder = snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"])
        if not (Path(folder) / "model.safetensors").is_file():  # older repos hold only the pickle
            folder = snapshot_download(repo, allow_patterns=["config.json", "pytorch_model.bin"])
    except Exception as e:  # offline, unreachable, rate-limited: all mean "not available here"
        raise ModelNotAvailable(
            f"model {name!r} is not cached and {repo} could not be downloaded ({type(e).__name__}). "
            f"Use `--model demo` (bundled), `--model PATH` with a local weights file, or "
            f"`ddetr weights import PATH --name {name}`"
        ) from None
    model = load_model(folder)
    out = save_model(model, home() / "models" / f"{name}.safetensors", extra_meta={"source": f"hub:{repo}"})
    register(name, out, source=f"hub:{repo}", description=HUB_MODELS[name][1])
    return out


def resolve(name_or_path: str | Path | None) -> Path:
    """A weights path for a file/folder path or a model name; pulls hub models when needed."""
    target = str(name_or_path or DEFAULT_MODEL)
    p = Path(target).expanduser()
    if p.exists():
        return p
    entry = get(target)
    if entry is not None and entry.path and Path(entry.path).exists():
        return Path(entry.path)
    if target in HUB_MODELS:
        return pull(target)
    if entry is not None:
        raise ModelNotAvailable(f"model {target!r} points to {entry.path}, which no longer exists")
    if "/" in target or p.suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"):
        raise ModelNotAvailable(f"weights not found: {target}")
    raise ModelNotAvailable(
        f"no model or file named {target!r}; `ddetr weights list` shows the names, or pass a weights path"
    )

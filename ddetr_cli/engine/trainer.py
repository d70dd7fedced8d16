"""Fine-tuning engine: ``ddetr finetune DATA`` and its Python API.

The recipe is the reference one (Hungarian matching, focal/L1/GIoU losses with auxiliary and
encoder terms, AdamW with a 10x smaller backbone lr and 0.1x for sampling offsets / reference
points, grad clip 0.1, one StepLR drop, flip + multi-scale resize/crop), plus AMP on GPU, EMA
weights, gradient accumulation, early stopping on val mAP and DDP through ``torchrun``.
DETR models (``arch: detr``) train with DETR's own loss (``losses.build_criterion``); a DETR mask
head is kept frozen (boxes only: the datasets here have no masks).

A run lives in ``<out>/expN`` (``out`` defaults to ``runs/finetune``)::

    args.json          options used (resolved)
    last.pt            full training state (model, EMA, optimizer, scheduler, RNG, position)
    last.safetensors   weights at the end of the last finished epoch (project format)
    best.safetensors   weights with the best val mAP@[.5:.95] (project format; for detect/eval)
    results.csv        one row per epoch
    results.png        loss and mAP curves
    progress.json      position of the last checkpoint (for monitoring)

Exact resume: the sample order of an epoch is a permutation seeded by (seed, epoch) and each
sample's augmentation uses a generator seeded by (seed, epoch, index), so the data of any step
is a function of its position alone; the rest of the randomness (dropout) comes from the global
torch generator, whose state is saved with every checkpoint. Checkpoints are written every
``save_period`` optimizer steps and at each epoch end, always via a temporary file and
``os.replace``.

Run it distributed with ``torchrun --nproc-per-node N -m ddetr_cli.engine.trainer DATA ...``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset as TorchDataset

from ddetr_cli.engine.options import DEFAULT_OUT, FinetuneError, FinetuneOptions, parse_arch
from ddetr_cli.models.config import VIT_SIZES, ModelConfig
from ddetr_cli.engine.predictor import pick_device as detector_pick_device
from ddetr_cli.engine.predictor import Detector
from ddetr_cli.files import atomic_write_text as atomic_write
from ddetr_cli.files import next_run_dir as new_run_dir
from ddetr_cli.data.datasets import Dataset, DatasetError, Record, load_dataset
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.models.losses import build_criterion
from ddetr_cli.models.build import build_model
from ddetr_cli.models.deformable_detr import DeformableDETR
from ddetr_cli.data.transforms import pad_batch, to_tensor, train_transforms, val_transforms
from ddetr_cli.weights.vit import load_timm_vit
from ddetr_cli.weights.load import WeightsError, canonical_state_dict, load_state_dict_strict, read_weights, save_model

STATE_FORMAT = "ddetr-train-state"
STATE_VERSION = 1
@dataclass
class DistInfo:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def dist_from_env() -> DistInfo:
    """torchrun's WORLD_SIZE / RANK / LOCAL_RANK (defaults: a single process)."""
    return DistInfo(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str | None, info: DistInfo) -> torch.device:
    """--device for this process (under torchrun 'auto'/'cuda' mean the process's own GPU)."""
    try:
        return detector_pick_device(requested, info.local_rank)
    except ValueError as e:
        raise FinetuneError(f"--{e}") from None


def _broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# data


class TrainSet(TorchDataset):
    """Indexed by (index, epoch): the augmentation generator is seeded by (seed, epoch, index)."""

    def __init__(self, records: list[Record], imgsz: int, seed: int, train: bool = True) -> None:
        self.records, self.seed = records, seed
        self.tf = train_transforms(imgsz) if train else val_transforms(imgsz)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        idx, epoch = key
        r = self.records[idx]
        rng = np.random.default_rng([self.seed, epoch, idx])
        try:
            img = r.read()
        except DatasetError:
            # A file that became unreadable after loading: train on a blank frame without boxes
            # rather than losing the run mid-epoch.
            img = np.full((r.height, r.width, 3), 114, np.uint8)
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        else:
            boxes, labels = r.boxes.astype(np.float32).reshape(-1, 4), r.labels.astype(np.int64).reshape(-1)
        x, target = to_tensor(self.tf((img, boxes, labels), rng))
        target["image_id"] = r.image_id
        target["orig_size"] = (r.height, r.width)
        return x, target


def collate(items: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """-> (images (B, 3, H, W), mask (B, H, W) True on padding, targets)."""
    images, mask = pad_batch([x for x, _ in items])
    return images, mask, [t for _, t in items]


def epoch_batches(n: int, batch: int, seed: int, epoch: int, info: DistInfo) -> list[list[tuple[int, int]]]:
    """This rank's batches of (index, epoch) for an epoch.

    The permutation is seeded by (seed, epoch); it is padded by wrapping around to a multiple of
    the world size and dealt round-robin, like DistributedSampler, so every rank gets the same
    number of batches.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / info.world) * info.world
    perm = (perm * math.ceil(total / n))[:total]
    mine = perm[info.rank :: info.world]
    return [[(i, epoch) for i in mine[j : j + batch]] for j in range(0, len(mine), batch)]


def _loader(ds: TrainSet, batches: list[list[tuple[int, int]]], workers: int, pin: bool) -> DataLoader:
    # A private generator: creating an iterator must not consume the global torch RNG, whose
    # stream (dropout) has to be identical whether an epoch starts fresh or mid-way on resume.
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# model, optimiser, EMA


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
    the fine-tuned model downstream).
    """
    model, source = _starting_model(labels.names, opts)
    # Same architecture, only the recorded ids and input size change: safe to swap the config.
    model.cfg = dataclasses.replace(model.cfg, imgsz=opts.imgsz, category_ids=[c.id for c in labels])
    return model, source


def _starting_model(class_names: list[str], opts: FinetuneOptions) -> tuple[DeformableDETR, str]:
    n = len(class_names)
    if opts.new_model:
        arch = parse_arch(opts.arch)
        if opts.backbone:
            if arch.setdefault("backbone", opts.backbone) != opts.backbone:
                raise FinetuneError(f"--backbone {opts.backbone} contradicts --arch backbone={arch['backbone']}")
        try:
            cfg = ModelConfig.from_variant(opts.variant, **arch, num_classes=n, class_names=list(class_names))
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
    if list(cfg.class_names) == list(class_names) and cfg.num_classes == n:
        model = build_model(cfg)
        load_state_dict_strict(model, sd, source=str(path))
        return model, f"{path} ({layout}), all weights kept"
    new_cfg = dataclasses.replace(cfg, num_classes=n, class_names=list(class_names), category_ids=[])
    model = build_model(new_cfg)
    own = model.state_dict()
    # Keep every tensor but the class heads, which take the fresh (prior-biased) init.
    sd = {k: v for k, v in sd.items() if "class_embed" not in k}
    sd.update({k: v for k, v in own.items() if "class_embed" in k})
    load_state_dict_strict(model, sd, source=str(path))
    return model, f"{path} ({layout}), class head re-initialised for {n} classes (was {cfg.num_classes})"


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


# ---------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def evaluate_map(model: nn.Module, dataset: Dataset, imgsz: int, device: torch.device, batch: int = 4,
                 workers: int = 0) -> dict[str, float]:
    """COCO mAP of ``model`` on ``dataset``: {"AP", "AP50", "AP75"} (fractions, 0 if undefined).

    This is ``ddetr eval``'s own path (``Detector`` preprocessing and post-processing, top 100
    without threshold, the same COCOeval), with the model left unfused so training goes on: the
    number that picks ``best.safetensors`` is the number ``ddetr eval`` reports for it.
    """
    from ddetr_cli.engine.evaluator import evaluate

    was_training = model.training
    try:
        detector = Detector(model, device=device, imgsz=imgsz, optimize=False)
        m = evaluate(detector, dataset, batch=batch, conf=0.0, max_det=100, plot=False, workers=max(1, workers)).metrics
    finally:
        model.train(was_training)
    return {k: m[k] or 0.0 for k in ("AP", "AP50", "AP75")}


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def find_resume_state(resume: str, out: str) -> Path:
    """'latest' / '' -> newest last.pt under ``out``; a run folder or a .pt path -> its last.pt."""
    if resume in ("", "latest", "last", "true", "True"):
        runs = sorted(Path(out).glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FinetuneError(f"--resume: no run with a last.pt under {out}")
        return runs[-1]
    p = Path(resume).expanduser()
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FinetuneError(f"--resume: {p} does not exist")
    return p


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict) -> None:
    random.setstate(tuple(s["python"][:1]) + (tuple(s["python"][1]),) + tuple(s["python"][2:]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# the engine


@dataclass
class FinetuneResult:
    run_dir: Path
    best: Path | None
    last: Path | None
    best_ap: float
    epochs_done: int
    finished: bool
    registered: str | None = None
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "best": str(self.best) if self.best else None,
                "last": str(self.last) if self.last else None, "best_ap": self.best_ap,
                "epochs_done": self.epochs_done, "finished": self.finished, "registered": self.registered,
                "history": self.history}


class Trainer:
    """One fine-tuning run (fresh or resumed). Use :func:`finetune` rather than this directly."""

    LOSS_KEYS = ("loss", "cls", "bbox", "giou")

    def __init__(self, opts: FinetuneOptions, info: DistInfo, device: torch.device, console: Any,
                 run_dir: Path | None, state: dict | None = None) -> None:
        self.o, self.info, self.device, self.console, self.run_dir = opts, info, device, console, run_dir
        o = opts
        if o.deterministic:
            # CPU kernels here are deterministic; on CUDA this asks for deterministic variants
            # where PyTorch has them and only warns where it has not.
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(o.seed + info.rank)

        self.train_set = load_dataset(Path(o.data), "train", o.format, val_fraction=o.val_fraction, seed=o.seed)
        try:
            self.val_set: Dataset | None = load_dataset(Path(o.data), "val", o.format, val_fraction=o.val_fraction, seed=o.seed)
        except DatasetError as e:
            self.val_set = None
            self.print(f"[yellow]no validation split ({e}); best = last, no early stopping[/]")
        if not any(len(r.labels) for r in self.train_set.records):
            raise DatasetError(f"{o.data}: the train split has no boxes; nothing to learn")
        if self.val_set is not None and self.val_set.class_names != self.train_set.class_names:
            raise DatasetError(f"{o.data}: train and val splits list different classes")

        if state is not None:
            cfg = ModelConfig.from_dict(state["model_config"])
            self.model = build_model(cfg)
            if o.new_model:  # same trainable set (hence optimizer layout) as the interrupted run
                self.model.backbone.body.prepare_scratch_()
            load_state_dict_strict(self.model, state["model"], source="last.pt")
            self.model_source = f"resumed from {run_dir / 'last.pt'}"
        else:
            self.model, self.model_source = starting_model(self.train_set.labels, o)
        self.model.to(device).train()
        self.cfg = self.model.cfg
        if self.cfg.masks:  # boxes only: DETR's mask head keeps its weights (no mask targets here)
            self.model.freeze_mask_head()

        lr_backbone = o.lr_backbone if o.lr_backbone is not None else o.lr / 10
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.lr, lr_backbone, o.weight_decay), lr=o.lr,
                                           weight_decay=o.weight_decay)
        self.lr_drop = o.lr_drop or max(1, round(0.8 * o.epochs))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, self.lr_drop, gamma=0.1)
        self.amp_dtype: torch.dtype | None = None
        if o.amp and device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEMA(self.model, o.ema_decay) if o.ema else None
        self.criterion = build_criterion(self.cfg)
        self.ddp_model: nn.Module = self.model
        if info.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)

        # position and bookkeeping (all of it saved in last.pt)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_ap = -1.0
        self.best_epoch = -1
        self.bad_epochs = 0
        self.history: list[dict] = []
        self.step_log: list[list[float]] = []  # [global_step, loss] per optimizer step
        self.sums: dict[str, float] = {}
        self.epoch_time = 0.0
        self.finished = False
        self.stop_reason = ""
        self.resumed_from: list[int] = []
        self.nonfinite = 0
        if state is not None:
            self._load_state(state)

    # -- printing ---------------------------------------------------------------------------
    def print(self, *a: Any) -> None:
        if self.info.main and self.o.verbose:
            self.console.print(*a)

    # -- state ------------------------------------------------------------------------------
    def _state(self, rngs: list[dict]) -> dict:
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "options": asdict(self.o), "model_config": self.cfg.to_dict(),
            "model": canonical_state_dict(self.model),
            "ema": canonical_state_dict(self.ema.module) if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_ap": self.best_ap, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": self.history, "step_log": self.step_log, "sums": self.sums, "epoch_time": self.epoch_time,
            "finished": self.finished, "stop_reason": self.stop_reason, "resumed_from": self.resumed_from,
            "rng": rngs, "world_size": self.info.world,
        }

    def _load_state(self, s: dict) -> None:
        if self.ema:
            if s.get("ema") is not None:
                load_state_dict_strict(self.ema.module, s["ema"], source="last.pt (ema)")
            self.ema.updates = int(s.get("ema_updates", 0))
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        # A resume may move a drop that has not happened yet (_extend_schedule checks that): the
        # next epoch's rate then follows the new step size, as in a fresh run with it.
        self.scheduler.step_size = self.lr_drop
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * self.scheduler.gamma ** (int(s["epoch"]) // self.lr_drop)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler.load_state_dict(s["scaler"])
        for k in ("epoch", "step_in_epoch", "global_step", "best_ap", "best_epoch", "bad_epochs", "history",
                  "step_log", "sums", "epoch_time", "finished", "stop_reason", "resumed_from"):
            setattr(self, k, s[k])
        self.resumed_from = list(self.resumed_from) + [self.global_step]
        rngs = s.get("rng") or []
        if len(rngs) == self.info.world:
            _set_rng_state(rngs[self.info.rank])
        elif rngs:
            self.print(f"[yellow]resuming with {self.info.world} processes instead of {len(rngs)}: random streams restart[/]")
            seed_everything(self.o.seed + self.info.rank + 7919 * self.global_step)

    def save_state(self) -> None:
        """Write last.pt (and progress.json) atomically; every rank must call it (RNG gather)."""
        rng = _rng_state()
        if self.info.enabled:
            rngs: list[Any] = [None] * self.info.world
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if self.info.main:
            atomic_torch_save(self._state(rngs), self.run_dir / "last.pt")
            atomic_write(self.run_dir / "progress.json", json.dumps({
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "finished": self.finished, "best_ap": self.best_ap}))

    # -- training ---------------------------------------------------------------------------
    def eval_model(self) -> DeformableDETR:
        return self.ema.module if self.ema else self.model

    def steps_per_epoch(self) -> int:
        n_batches = len(epoch_batches(len(self.train_set), self.o.batch, self.o.seed, 0, self.info))
        return math.ceil(n_batches / self.o.accumulate)

    def _train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor, list[dict]]]) -> dict[str, float]:
        """One optimizer step over ``micro`` (accumulated micro-batches) -> mean loss terms."""
        logs: dict[str, float] = {k: 0.0 for k in self.LOSS_KEYS}
        for j, (images, mask, targets) in enumerate(micro):
            images, mask = images.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
            targets = [{"labels": t["labels"].to(self.device), "boxes": t["boxes"].to(self.device)} for t in targets]
            sync = j == len(micro) - 1 or not self.info.enabled
            ctx = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            with ctx:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    out = self.ddp_model(images, mask)
                losses = self.criterion(out, targets)
                self.scaler.scale(losses["loss"] / len(micro)).backward()
            for k in self.LOSS_KEYS:
                logs[k] += float(losses[k].detach()) / len(micro)
        finite = math.isfinite(logs["loss"])
        if self.info.enabled:  # every rank must take (or skip) the step together
            flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item())
        if finite:
            self.scaler.unscale_(self.optimizer)
            if self.o.clip_max_norm > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.o.clip_max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema:
                self.ema.update(self.model)
        else:
            self.nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        return logs

    def _progress(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class Speed(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s")

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Speed(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                        disable=not (self.info.main and self.o.verbose), transient=False)

    def run(self) -> FinetuneResult:
        o = self.o
        if self.finished and not self._max_steps_reached() and self.epoch < o.epochs and (
                self.stop_reason.startswith("reached --max-steps") or self.stop_reason.startswith("completed")):
            self.finished = False  # resumed with a larger --max-steps or --epochs: keep training
        if self.finished:
            # Said even with --quiet: it is the whole answer to this call.
            if self.info.main:
                self.console.print(f"run {self.run_dir} is already finished ({self.stop_reason}); best mAP {max(self.best_ap, 0):.4f}. "
                                   "Start a new run to train more.")
            return self._result()
        spe = self.steps_per_epoch()
        if self.resumed_from:
            self.print(f"resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.step_in_epoch}/{spe} "
                       f"(global step {self.global_step})")
        while not self.finished:
            if self.step_in_epoch < spe and not self._max_steps_reached():
                self._train_epoch(spe)
            self._end_epoch(spe)
        return self._result()

    def _max_steps_reached(self) -> bool:
        return self.o.max_steps is not None and self.global_step >= self.o.max_steps

    def _train_epoch(self, spe: int) -> None:
        o = self.o
        batches = epoch_batches(len(self.train_set), o.batch, o.seed, self.epoch, self.info)
        start = self.step_in_epoch * o.accumulate
        ds = TrainSet(self.train_set.records, o.imgsz, o.seed)
        loader = _loader(ds, batches[start:], o.workers, self.device.type == "cuda")
        self.model.train()
        t0 = time.time()
        with self._progress() as prog:
            task = prog.add_task(f"epoch {self.epoch + 1}/{o.epochs}", total=spe, completed=self.step_in_epoch, info="")
            micro: list = []
            remaining = len(batches) - start
            for i, mb in enumerate(loader):
                micro.append(mb)
                if len(micro) < o.accumulate and i != remaining - 1:
                    continue
                logs = self._train_step(micro)
                micro = []
                self.step_in_epoch += 1
                self.global_step += 1
                for k, v in logs.items():
                    self.sums[k] = self.sums.get(k, 0.0) + v
                self.sums["n"] = self.sums.get("n", 0.0) + 1
                self.step_log.append([float(self.global_step), logs["loss"]])
                self.epoch_time += time.time() - t0
                t0 = time.time()
                prog.update(task, advance=1, info=f"loss {logs['loss']:.3f}")
                if o.save_period and self.global_step % o.save_period == 0 and self.step_in_epoch < spe:
                    self.save_state()
                if self._max_steps_reached():
                    break

    def _end_epoch(self, spe: int) -> None:
        o = self.o
        n = max(self.sums.get("n", 0.0), 1.0)
        metrics = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        if self.info.main and self.val_set is not None:
            metrics = evaluate_map(self.eval_model(), self.val_set, o.imgsz, self.device)
        metrics = _broadcast(metrics, self.info)
        row = {"epoch": self.epoch + 1, "steps": self.global_step,
               **{k: self.sums.get(k, 0.0) / n for k in self.LOSS_KEYS},
               "lr": self.optimizer.param_groups[-1]["lr"],
               "AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"], "time": self.epoch_time}
        self.history.append(row)
        self.scheduler.step()
        improved = metrics["AP"] > self.best_ap or self.val_set is None
        if improved:
            self.best_ap, self.best_epoch, self.bad_epochs = metrics["AP"], self.epoch + 1, 0
        else:
            self.bad_epochs += 1
        if self.info.main:
            meta = {"epoch": str(self.epoch + 1), "val_AP": f"{metrics['AP']:.5f}", "run": str(self.run_dir)}
            save_model(self.eval_model(), self.run_dir / "last.safetensors", extra_meta=meta)
            if improved:
                save_model(self.eval_model(), self.run_dir / "best.safetensors", extra_meta=meta)
            self._write_results()
            self._print_epoch(row)
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums, self.epoch_time = {}, 0.0
        if self._max_steps_reached():
            self.finished, self.stop_reason = True, f"reached --max-steps {o.max_steps}"
        elif self.epoch >= o.epochs:
            self.finished, self.stop_reason = True, f"completed {o.epochs} epochs"
        elif o.patience and self.val_set is not None and self.bad_epochs >= o.patience:
            self.finished, self.stop_reason = True, f"early stop: no val mAP gain for {o.patience} epochs"
        self.save_state()

    # -- outputs ----------------------------------------------------------------------------
    def _write_results(self) -> None:
        if not self.history:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(self.history[0]))
        w.writeheader()
        for r in self.history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        atomic_write(self.run_dir / "results.csv", buf.getvalue())
        try:
            plot_results(self.history, self.run_dir / "results.png")
        except ImportError:
            pass  # matplotlib is optional: the CSV has everything

    def _print_epoch(self, row: dict) -> None:
        if not self.o.verbose:
            return
        from rich.table import Table

        t = Table(title=f"epoch {row['epoch']}/{self.o.epochs}", show_edge=False)
        # AP75 and the step count are in results.csv; the table stays within 80 columns.
        for k in ("loss", "cls", "bbox", "giou", "lr", "AP", "AP50", "time"):
            t.add_column(k, justify="right", no_wrap=True)
        t.add_row(*[f"{row['loss']:.4f}", f"{row['cls']:.4f}", f"{row['bbox']:.4f}", f"{row['giou']:.4f}",
                    f"{row['lr']:.1e}", f"{row['AP']:.4f}", f"{row['AP50']:.4f}", f"{row['time']:.1f}s"])
        self.console.print(t)
        if self.nonfinite:
            self.console.print(f"[yellow]skipped {self.nonfinite} steps with a non-finite loss[/]")

    def _result(self) -> FinetuneResult:
        best = self.run_dir / "best.safetensors"
        last = self.run_dir / "last.safetensors"
        return FinetuneResult(self.run_dir, best if best.exists() else None, last if last.exists() else None,
                              self.best_ap, self.epoch, self.finished, history=list(self.history))


def plot_results(history: list[dict], path: Path) -> None:
    """Loss terms and val mAP per epoch into one PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["loss"] for r in history], marker="o")
    axes[0].set_title("total loss")
    for k in ("cls", "bbox", "giou"):
        axes[1].plot(ep, [r[k] for r in history], marker="o", label=k)
    axes[1].set_title("final-layer terms")
    axes[1].legend()
    for k in ("AP", "AP50"):
        axes[2].plot(ep, [r[k] for r in history], marker="o", label=k)
    axes[2].set_title("val mAP")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# public API


def _console(info: DistInfo) -> Any:
    from rich.console import Console

    return Console(quiet=not info.main, highlight=False, soft_wrap=True)


def _effective_lr_drop(o: FinetuneOptions) -> int:
    return o.lr_drop or max(1, round(0.8 * o.epochs))


def _extend_schedule(opts: FinetuneOptions, state: dict, epochs: int | None, lr_drop: int | None) -> None:
    """Apply --epochs/--lr-drop given with --resume, refusing changes that rewrite trained epochs.

    The result equals a fresh run started with the new values: epochs already trained saw the same
    learning rate under both schedules (no drop moves into or out of the past)."""
    done = int(state["epoch"]) + (1 if state["step_in_epoch"] else 0)  # epochs (partly) trained
    old_drop = _effective_lr_drop(opts)
    if epochs is not None:
        if epochs < done:
            raise FinetuneError(f"--epochs {epochs} with --resume: the run has already trained {done} epoch(s)")
        opts.epochs = epochs
        follows = _effective_lr_drop(opts)
        if opts.lr_drop is None and follows != old_drop and min(follows, old_drop) < done:
            opts.lr_drop = old_drop  # the default drop would move into the past: keep it where it was
    if lr_drop is not None:
        opts.lr_drop = lr_drop
    new_drop = _effective_lr_drop(opts)
    if new_drop != old_drop and min(new_drop, old_drop) < done:
        raise FinetuneError(f"--lr-drop {new_drop} with --resume: the learning rate of the {done} epoch(s) "
                            f"already trained would change (it drops after epoch {old_drop})")


def finetune(data: str | Path | None = None, *, resume: str | None = None, **options: Any) -> FinetuneResult:
    """Fine-tune a model on the dataset folder ``data`` (COCO/YOLO/VOC); see FinetuneOptions.

    ``resume``: a run folder, its ``last.pt``, or "latest" to continue an interrupted run with
    its own options (only ``device``, ``workers``, ``save_period``, ``verbose``, ``max_steps``,
    ``epochs`` and ``lr_drop`` may change, the last two only where the epochs already trained are
    unaffected; a run stopped by ``--max-steps`` or ``--epochs`` continues when given a larger one).
    Raises DatasetError, WeightsError or FinetuneError with one-line messages.
    Under torchrun (WORLD_SIZE > 1) every process calls this; rank 0 writes the files.
    """
    info = dist_from_env()
    unknown = set(options) - {f.name for f in dataclasses.fields(FinetuneOptions)}
    if unknown:
        raise FinetuneError(f"unknown option(s): {', '.join(sorted(unknown))}")
    out = options.get("out") or DEFAULT_OUT
    state = None
    if resume is not None:
        ckpt = find_resume_state(resume, out)
        state = _load_train_state(ckpt)
        saved = state["options"]
        opts = FinetuneOptions(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(FinetuneOptions)}})
        for k in ("device", "workers", "save_period", "verbose", "max_steps"):
            if options.get(k) is not None:
                setattr(opts, k, options[k])
        _extend_schedule(opts, state, options.get("epochs"), options.get("lr_drop"))
        run_dir = ckpt.parent
    else:
        if data is None:
            raise FinetuneError("a dataset folder is required (or --resume)")
        opts = FinetuneOptions(**{k: v for k, v in options.items() if v is not None})
        opts.data = str(Path(data).resolve())
        opts.out = str(out)
        run_dir = None
    opts.validate()
    device = pick_device(opts.device, info)
    own_group = False
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    try:
        console = _console(info)
        # Data and model first: a run folder is only made for a run that can start.
        trainer = Trainer(opts, info, device, console, run_dir, state)
        if run_dir is None:
            run_dir = _broadcast(new_run_dir(Path(opts.out)) if info.main else None, info)
            trainer.run_dir = run_dir
        if info.main and (state is not None or not (run_dir / "args.json").exists()):
            atomic_write(run_dir / "args.json", json.dumps({**asdict(opts), "world_size": info.world}, indent=2))
        for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-write
            if info.main:
                stale.unlink(missing_ok=True)
        if info.main and opts.verbose and state is None:
            ts, vs = trainer.train_set, trainer.val_set
            console.print(f"[bold]finetune[/] {opts.data} ({ts.format}) -> {run_dir}")
            console.print(f"classes ({len(ts.class_names)}): {', '.join(ts.class_names)}")
            for line in ts.report.summary():
                console.print(f"  train: {line}")
            if vs is not None:
                for line in vs.report.summary():
                    console.print(f"  val:   {line}")
            console.print(f"model: {trainer.model_source}")
            console.print(f"device {device}, {info.world} process(es), batch {opts.batch} x accumulate {opts.accumulate}"
                          f" x {info.world}, imgsz {opts.imgsz}, amp {trainer.amp_dtype or 'off'}, ema {'on' if opts.ema else 'off'}")
        result = trainer.run()
        already = state is not None and bool(state.get("finished"))
        if info.main and result.finished and not already:
            if result.best is not None and opts.register:
                result.registered = _register(opts.name, result.best, run_dir, console, opts.verbose, opts.force)
            if opts.verbose:
                console.print(f"done: {trainer.stop_reason}; best val mAP {max(result.best_ap, 0):.4f} "
                              f"(epoch {trainer.best_epoch}) -> {result.best}")
        return result
    finally:
        if own_group:
            dist.destroy_process_group()


def _register(name: str | None, best: Path, run_dir: Path, console: Any, verbose: bool, force: bool) -> str | None:
    """Register ``best`` as ``name`` (checked before training), or by default as the run folder's
    name made unique, so that runs in different --out parents never replace each other."""
    from ddetr_cli.weights.store import register, unique_name

    name = name or unique_name(run_dir.name)
    try:
        register(name, best, source="finetune", description=f"fine-tuned in {run_dir}", force=force)
    except (ValueError, OSError) as e:
        if verbose:
            console.print(f"[yellow]not registered as {name!r}: {e}[/]")
        return None
    if verbose:
        console.print(f"registered as [bold]{name}[/] (ddetr detect --model {name})")
    return name


def _load_train_state(path: Path) -> dict:
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"cannot read training state {path} ({msg})") from None
    if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
        raise FinetuneError(f"{path} is not a ddetr training state")
    if s.get("version") != STATE_VERSION:
        raise FinetuneError(f"{path}: training state version {s.get('version')} is not supported")
    return s


def finetune_command(data: str | None = None, *, resume: str | None = None, quiet: bool = False,
                     as_json: bool = False, **options: Any) -> int:
    """CLI entry (``ddetr finetune``, also under torchrun): run :func:`finetune` and turn known
    errors into one red line. ``options`` are ``FinetuneOptions`` fields; ``None`` means "not
    given" (the default, or on resume the run's own value). ``resume``: None = fresh run; "latest"
    = newest run under ``out``; else a run folder/last.pt. ``as_json``: the result as one JSON
    object on stdout (rank 0). Returns the exit code: 0 done (or already finished), 2 bad input,
    130 interrupted.
    """
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        res = finetune(data, resume=resume, verbose=not (quiet or as_json), **options)
    except (DatasetError, WeightsError, FinetuneError) as e:
        err.print(f"[red]error:[/] {e}")
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: continue with --resume")
        return 130
    if as_json and dist_from_env().main:
        print(json.dumps(res.to_dict()))
    return 0

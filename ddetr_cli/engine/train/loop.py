"""The training loop: ``Trainer.run_step`` (one optimizer step over accumulated micro-batches,
AMP, clipping, EMA) inside an epoch loop that calls its hooks (``hooks.py``) after every step and
at every epoch end, plus Ctrl-C handling that stops at a step boundary with a checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddetr_cli.data.datasets import Dataset, DatasetError, load_dataset
from ddetr_cli.engine.options import FinetuneError, FinetuneOptions
from ddetr_cli.engine.stop import Interrupted, StopRequest
from ddetr_cli.engine.train.data import TrainSet, epoch_batches, make_loader
from ddetr_cli.engine.train.dist import DistInfo, any_rank
from ddetr_cli.engine.train.evaluation import BestCheckpoint
from ddetr_cli.engine.train.hooks import Checkpointer, EarlyStopping, HookBase, LRSchedule, NonFiniteGuard
from ddetr_cli.engine.train.model import ModelEMA, param_groups, resumed_model, starting_model
from ddetr_cli.engine.train.results import ResultsWriter
from ddetr_cli.engine.train.state import STATE_FORMAT, STATE_VERSION, effective_lr_drop, seed_everything, set_rng_state
from ddetr_cli.models.deformable_detr import DeformableDETR
from ddetr_cli.models.losses import build_criterion
from ddetr_cli.weights.load import canonical_state_dict, load_state_dict_strict


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


STOP_NOTICE = "stopping after this step with a checkpoint (Ctrl-C again to stop at once)"


class TrainingInterrupted(Interrupted):
    """Ctrl-C (or SIGTERM) during training. ``checkpoint``: the last.pt that ``--resume`` continues
    from (None when there is none), at global step ``step``; ``exact``: written at the step the run
    reached (otherwise it is the latest periodic or epoch-end one); ``signum``: the signal."""

    def __init__(self, run_dir: Path, checkpoint: Path | None, step: int | None, exact: bool,
                 signum: int = signal.SIGINT) -> None:
        super().__init__(str(checkpoint), signum)
        self.run_dir, self.checkpoint, self.step, self.exact = run_dir, checkpoint, step, exact


class Trainer:
    """One fine-tuning run (fresh or resumed). Use :func:`finetune` rather than this directly.

    Owns the data, model, optimizer, AMP scaler, EMA, DDP wrapper and the position; everything
    else is a hook in ``self.hooks`` (order matters: each may read what earlier ones added to
    ``epoch_log``; the checkpointer is last).
    """

    LOSS_KEYS = ("loss", "cls", "bbox", "giou")
    MASK_KEYS = ("mask", "dice")  # with a trained mask head

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
            self.model = resumed_model(state["model_config"], state["model"], o)
            self.model_source = f"resumed from {run_dir / 'last.pt'}"
        else:
            self.model, self.model_source = starting_model(self.train_set.labels, o)
        self.model.to(device).train()
        self.cfg = self.model.cfg
        has_masks = any(r.has_masks for r in self.train_set.records)
        self.train_masks = bool(self.cfg.masks and o.train_masks and has_masks)
        if o.freeze_boxes and not self.train_masks:
            raise FinetuneError("--freeze-boxes trains the mask head only: it needs a model with a mask head, data with "
                                "segmentations and no --no-train-masks")
        if o.freeze_boxes and "class head re-initialised" in self.model_source:
            raise FinetuneError("--freeze-boxes keeps the detector as it is: start from a model trained on these classes")
        if self.cfg.masks and not self.train_masks:  # boxes only: DETR's mask head keeps its weights
            self.model.freeze_mask_head()
        if o.freeze_boxes:
            self.model.freeze_detector()
        self.loss_keys = self.LOSS_KEYS + (self.MASK_KEYS if self.train_masks else ())

        lr_backbone = o.lr_backbone if o.lr_backbone is not None else o.lr / 10
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.lr, lr_backbone, o.weight_decay), lr=o.lr,
                                           weight_decay=o.weight_decay)
        self.lr_schedule = LRSchedule(self.optimizer, effective_lr_drop(o))
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

        self.evaluation = BestCheckpoint(self.val_set, o.imgsz)
        self.results = ResultsWriter()
        self.hooks: list[HookBase] = [
            NonFiniteGuard(lr=o.lr),  # first: a diverged epoch is neither evaluated nor saved
            self.evaluation,
            self.lr_schedule,
            self.results,
            EarlyStopping(o.patience),
            Checkpointer(o.save_period),
        ]

        # position and bookkeeping (all of it saved in last.pt)
        self.epoch = 0  # epochs finished
        self.step_in_epoch = 0  # optimizer steps done in the current epoch
        self.global_step = 0
        self.step_log: list[list[float]] = []  # [global_step, loss] per optimizer step
        self.sums: dict[str, float] = {}  # running loss sums of the current epoch
        self.epoch_time = 0.0
        self.finished = False
        self.stop_reason = ""
        self.resumed_from: list[int] = []
        self.step_finite = True  # the last step's loss was finite (for the hooks)
        self.epoch_log: dict[str, Any] = {}  # the ending epoch's numbers (for the hooks)
        self.steps_per_epoch = math.ceil(len(epoch_batches(len(self.train_set), o.batch, o.seed, 0, info)) / o.accumulate)
        self.stop = StopRequest(notice=STOP_NOTICE if info.main and o.verbose else None)
        if state is not None:
            self.load_state_dict(state)

    # -- what the hooks and finetune() read -------------------------------------------------
    def print(self, *a: Any) -> None:
        if self.info.main and self.o.verbose:
            self.console.print(*a)

    def eval_model(self) -> DeformableDETR:
        return self.ema.module if self.ema else self.model

    @property
    def best_ap(self) -> float:
        return self.evaluation.best_ap

    @property
    def best_epoch(self) -> int:
        return self.evaluation.best_epoch

    @property
    def history(self) -> list[dict]:
        return self.results.history

    def finish(self, reason: str) -> None:
        self.finished, self.stop_reason = True, reason

    def max_steps_reached(self) -> bool:
        return self.o.max_steps is not None and self.global_step >= self.o.max_steps

    # -- state --------------------------------------------------------------------------------
    def state_dict(self, rngs: list[dict]) -> dict:
        """The whole of last.pt (see ``state.py``); ``rngs``: every rank's RNG state."""
        s = {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "options": asdict(self.o), "model_config": self.cfg.to_dict(),
            "model": canonical_state_dict(self.model),
            "ema": canonical_state_dict(self.ema.module) if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "step_log": self.step_log, "sums": self.sums, "epoch_time": self.epoch_time,
            "finished": self.finished, "stop_reason": self.stop_reason, "resumed_from": self.resumed_from,
            "rng": rngs, "world_size": self.info.world,
        }
        for h in self.hooks:
            own = h.state_dict()
            clash = own.keys() & s.keys()
            assert not clash, f"{type(h).__name__} state keys {clash} are taken"
            s.update(own)
        return s

    def load_state_dict(self, s: dict) -> None:
        if self.ema:
            if s.get("ema") is not None:
                load_state_dict_strict(self.ema.module, s["ema"], source="last.pt (ema)")
            self.ema.updates = int(s.get("ema_updates", 0))
        self.optimizer.load_state_dict(s["optimizer"])
        self.scaler.load_state_dict(s["scaler"])
        for k in ("epoch", "step_in_epoch", "global_step", "step_log", "sums", "epoch_time", "finished",
                  "stop_reason", "resumed_from"):
            setattr(self, k, s[k])
        for h in self.hooks:
            h.load_state_dict(s)
        self.resumed_from = list(self.resumed_from) + [self.global_step]
        rngs = s.get("rng") or []
        if len(rngs) == self.info.world:
            set_rng_state(rngs[self.info.rank])
        elif rngs:
            self.print(f"[yellow]resuming with {self.info.world} processes instead of {len(rngs)}: random streams restart[/]")
            seed_everything(self.o.seed + self.info.rank + 7919 * self.global_step)

    # -- training -------------------------------------------------------------------------------
    def run_step(self, micro: list[tuple[torch.Tensor, torch.Tensor, list[dict]]]) -> dict[str, float]:
        """One optimizer step over ``micro`` (accumulated micro-batches) -> mean loss terms.

        A non-finite loss (on any rank) skips the update; ``step_finite`` says which it was."""
        logs: dict[str, float] = {k: 0.0 for k in self.loss_keys}
        for j, (images, mask, targets) in enumerate(micro):
            images, mask = images.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
            keep = ("labels", "boxes", "masks", "mask_valid") if self.train_masks else ("labels", "boxes")
            targets = [{k: t[k].to(self.device) for k in keep if k in t} for t in targets]
            sync = j == len(micro) - 1 or not self.info.enabled
            ctx = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            with ctx:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    out = self.ddp_model(images, mask)
                losses = self.criterion(out, targets)
                self.scaler.scale(losses["loss"] / len(micro)).backward()
            for k in self.loss_keys:
                logs[k] += float(losses[k].detach()) / len(micro)
        # every rank must take (or skip) the step together
        self.step_finite = not any_rank(not math.isfinite(logs["loss"]), self.info, self.device)
        if self.step_finite:
            self.scaler.unscale_(self.optimizer)
            if self.o.clip_max_norm > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.o.clip_max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema:
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return logs

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; True when a stop was requested (Ctrl-C), which
        ends it at a step boundary."""
        o = self.o
        batches = epoch_batches(len(self.train_set), o.batch, o.seed, self.epoch, self.info)
        start = self.step_in_epoch * o.accumulate
        ds = TrainSet(self.train_set.records, o.imgsz, o.seed, masks=self.train_masks)
        loader = make_loader(ds, batches[start:], o.workers, self.device.type == "cuda")
        self.model.train()
        t0 = time.time()
        with self._progress() as prog:
            task = prog.add_task(f"epoch {self.epoch + 1}/{o.epochs}", total=self.steps_per_epoch,
                                 completed=self.step_in_epoch, info="")
            micro: list = []
            remaining = len(batches) - start
            for i, mb in enumerate(loader):
                micro.append(mb)
                if len(micro) < o.accumulate and i != remaining - 1:
                    continue
                logs = self.run_step(micro)
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
                for h in self.hooks:
                    h.after_step(self)
                if self.max_steps_reached():
                    break
                if self.stop_requested():
                    return True
        return False

    def end_epoch(self) -> None:
        """Close the epoch: its numbers into ``epoch_log``, the position to the next epoch, the
        stop decisions that depend on the position; then the hooks (evaluation, LR, results,
        early stopping, checkpoint)."""
        o = self.o
        n = max(self.sums.get("n", 0.0), 1.0)
        self.epoch_log = {"epoch": self.epoch + 1, "steps": self.global_step,
                          **{k: self.sums.get(k, 0.0) / n for k in self.loss_keys},
                          "lr": self.optimizer.param_groups[-1]["lr"], "time": self.epoch_time,
                          "epoch_steps": self.step_in_epoch}
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums, self.epoch_time = {}, 0.0
        if self.max_steps_reached():
            self.finish(f"reached --max-steps {o.max_steps}")
        elif self.epoch >= o.epochs:
            self.finish(f"completed {o.epochs} epochs")
        for h in self.hooks:
            h.after_epoch(self)

    def stop_requested(self) -> bool:
        """Ctrl-C on any rank (a collective under DDP: every rank calls it at the same points)."""
        return any_rank(self.stop.requested, self.info, self.device)

    def run(self) -> FinetuneResult:
        o = self.o
        if self.finished and not self.max_steps_reached() and self.epoch < o.epochs and (
                self.stop_reason.startswith("reached --max-steps") or self.stop_reason.startswith("completed")):
            self.finished = False  # resumed with a larger --max-steps or --epochs: keep training
        if self.finished:
            # Said even with --quiet: it is the whole answer to this call.
            if self.info.main:
                self.console.print(f"run {self.run_dir} is already finished ({self.stop_reason}); best mAP {max(self.best_ap, 0):.4f}. "
                                   "Start a new run to train more.")
            return self.result()
        if self.resumed_from:
            self.print(f"resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.step_in_epoch}/{self.steps_per_epoch} "
                       f"(global step {self.global_step})")
        with self.stop:
            try:
                for h in self.hooks:
                    h.before_train(self)
                while not self.finished:
                    if self.step_in_epoch < self.steps_per_epoch and not self.max_steps_reached():
                        if self.train_epoch():
                            Checkpointer.save(self)  # at the step reached: --resume goes on exactly from it
                            raise self.interrupted(exact=True)
                    self.end_epoch()  # its checkpoint is written by the Checkpointer hook
                    if not self.finished and self.stop_requested():
                        raise self.interrupted(exact=True)
                for h in self.hooks:
                    h.after_train(self)
            except TrainingInterrupted:
                raise
            except KeyboardInterrupt:  # a second Ctrl-C: whatever checkpoint there is
                raise self.interrupted(exact=False) from None
            except Exception:
                if self.stop.requested:  # e.g. evaluation's loader workers killed by the same Ctrl-C
                    raise self.interrupted(exact=False) from None
                raise
        return self.result()

    def interrupted(self, exact: bool) -> TrainingInterrupted:
        ckpt = self.run_dir / "last.pt" if self.run_dir is not None else None
        sig = self.stop.signum
        if ckpt is None or not ckpt.is_file():
            return TrainingInterrupted(self.run_dir, None, None, False, sig)
        if exact:
            return TrainingInterrupted(self.run_dir, ckpt, self.global_step, True, sig)
        try:
            step = int(json.loads((self.run_dir / "progress.json").read_text())["global_step"])
        except (OSError, ValueError, KeyError):
            step = None
        return TrainingInterrupted(self.run_dir, ckpt, step, False, sig)

    def _progress(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class Speed(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s")

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Speed(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                        disable=not (self.info.main and self.o.verbose), transient=False)

    def result(self) -> FinetuneResult:
        best = self.run_dir / "best.safetensors"
        last = self.run_dir / "last.safetensors"
        return FinetuneResult(self.run_dir, best if best.exists() else None, last if last.exists() else None,
                              self.best_ap, self.epoch, self.finished, history=list(self.history))

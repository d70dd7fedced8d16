"""The trainer's hooks (detectron2's idea): the loop in ``loop.py`` trains and calls
``after_step`` after every optimizer step and ``after_epoch`` at every epoch end; what happens
around it (LR schedule, early stopping, divergence, checkpoints, evaluation, results) is a hook,
each holding its own state and giving it to ``last.pt`` through ``state_dict()``.

Hooks run in list order and see the trainer as their argument: its position (``epoch``,
``step_in_epoch``, ``global_step``), ``step_finite`` (the last step's loss was finite) and, at an
epoch end, ``epoch_log`` (that epoch's numbers; hooks add theirs for the ones after them).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ddetr_cli.engine.options import FinetuneError
from ddetr_cli.engine.train.dist import gather
from ddetr_cli.engine.train.state import atomic_torch_save, rng_state
from ddetr_cli.files import atomic_write_text

# A run stops as diverged after this many optimizer steps in a row with a non-finite loss (each
# of them skipped), or when every step of an epoch had one: on the bundled data a healthy run
# never has even one, and a run whose weights have gone non-finite has nothing but.
NONFINITE_LIMIT = 5

Trainer = Any  # loop.Trainer (not imported: the loop imports the hooks)


class HookBase:
    """Does nothing; hooks override what they need."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_epoch(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """This hook's keys in last.pt (top-level keys: the file stays one flat dict)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a whole last.pt dict (read this hook's keys; default missing ones)."""


class TrainingDiverged(FinetuneError):
    """The loss stayed non-finite: the run stops and nothing is registered."""


class NonFiniteGuard(HookBase):
    """Counts steps skipped for a non-finite loss; raises TrainingDiverged after ``limit`` in a
    row, or at an epoch end when every step of that epoch was skipped (before anything is
    evaluated or saved for it)."""

    def __init__(self, limit: int = NONFINITE_LIMIT, lr: float | None = None) -> None:
        self.limit, self.lr = limit, lr
        self.streak = 0  # consecutive non-finite steps up to now
        self.skipped = 0  # in this process's run (shown in the epoch table)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step_finite:
            self.streak = 0
            return
        self.streak += 1
        self.skipped += 1
        if self.streak >= self.limit:
            raise self._error(trainer, f"for {self.streak} steps in a row")

    def after_epoch(self, trainer: Trainer) -> None:
        n = trainer.epoch_log["epoch_steps"]
        if n > 0 and self.streak >= n:
            raise self._error(trainer, f"for every step of epoch {trainer.epoch_log['epoch']}")
        trainer.epoch_log["skipped"] = self.skipped

    def _error(self, trainer: Trainer, how: str) -> TrainingDiverged:
        first = trainer.global_step - self.streak + 1
        hint = f"; try a lower --lr (this run: {self.lr:g})" if self.lr is not None else ""
        return TrainingDiverged(f"training diverged: the loss was not finite {how} (steps {first}-{trainer.global_step}); "
                                f"stopped without registering a model{hint}")

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state.get("nonfinite_streak", 0))


class LRSchedule(HookBase):
    """The reference StepLR: x0.1 after ``lr_drop`` epochs, stepped at each epoch end."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_drop: int) -> None:
        self.optimizer, self.lr_drop = optimizer, lr_drop
        self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, lr_drop, gamma=0.1)

    def after_epoch(self, trainer: Trainer) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After the optimizer's own state is loaded (its rates are set here)."""
        self.scheduler.load_state_dict(state["scheduler"])
        # A resume may move a drop that has not happened yet (state.extend_schedule checks that):
        # the next epoch's rate then follows the new step size, as in a fresh run with it.
        self.scheduler.step_size = self.lr_drop
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * self.scheduler.gamma ** (int(state["epoch"]) // self.lr_drop)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]


class EarlyStopping(HookBase):
    """Finishes the run after ``patience`` epochs without a val mAP gain (0 = never). Reads
    ``epoch_log["improved"]`` (from the evaluation hook before it)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.bad_epochs = 0

    def after_epoch(self, trainer: Trainer) -> None:
        self.bad_epochs = 0 if trainer.epoch_log["improved"] else self.bad_epochs + 1
        if not trainer.finished and self.patience and self.bad_epochs >= self.patience:
            trainer.finish(f"early stop: no val mAP gain for {self.patience} epochs")

    def state_dict(self) -> dict[str, Any]:
        return {"bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad_epochs = int(state["bad_epochs"])


class Checkpointer(HookBase):
    """Writes last.pt (and progress.json) every ``period`` optimizer steps within an epoch and
    at every epoch end (last in the hook list: after everything else has updated its state)."""

    def __init__(self, period: int) -> None:
        self.period = period

    def after_step(self, trainer: Trainer) -> None:
        if self.period and trainer.global_step % self.period == 0 and trainer.step_in_epoch < trainer.steps_per_epoch:
            self.save(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        self.save(trainer)

    @staticmethod
    def save(trainer: Trainer) -> None:
        """Write last.pt and progress.json atomically; every rank must call it (RNG gather)."""
        rngs = gather(rng_state(), trainer.info)
        if trainer.info.main:
            atomic_torch_save(trainer.state_dict(rngs), trainer.run_dir / "last.pt")
            atomic_write_text(trainer.run_dir / "progress.json", json.dumps({
                "epoch": trainer.epoch, "step_in_epoch": trainer.step_in_epoch, "global_step": trainer.global_step,
                "finished": trainer.finished, "best_ap": trainer.best_ap}))

"""The resumable training state, ``last.pt``: what it holds, writing it atomically, finding and
reading it for ``--resume``, and which options a resume may change.

last.pt is one flat dict (format ``ddetr-train-state``, version 1): the trainer's own keys
(options, model_config, model, ema, ema_updates, optimizer, scaler, position, step_log, sums,
epoch_time, finished, stop_reason, resumed_from, rng, world_size) plus each hook's
``state_dict()`` keys (scheduler; best_ap, best_epoch; bad_epochs; history; nonfinite_streak).
Keys added later are read with a default, so an older version-1 file still resumes.

Exactness: the data of a step is a function of its position (see ``data.py``); the rest of the
randomness (dropout) comes from the global generators, whose states are saved per rank.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddetr_cli.engine.options import FinetuneError, FinetuneOptions
from ddetr_cli.files import atomic_write_text

STATE_FORMAT = "ddetr-train-state"
STATE_VERSION = 1


def rng_state() -> dict:
    """This process's python, numpy, torch and CUDA generator states (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
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


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_text(path, buf.getvalue())


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


def load_train_state(path: Path) -> dict:
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


def effective_lr_drop(o: FinetuneOptions) -> int:
    """Epochs before the x0.1 drop: --lr-drop, else 80% of the epochs."""
    return o.lr_drop or max(1, round(0.8 * o.epochs))


def extend_schedule(opts: FinetuneOptions, state: dict, epochs: int | None, lr_drop: int | None) -> None:
    """Apply --epochs/--lr-drop given with --resume, refusing changes that rewrite trained epochs.

    The result equals a fresh run started with the new values: epochs already trained saw the same
    learning rate under both schedules (no drop moves into or out of the past)."""
    done = int(state["epoch"]) + (1 if state["step_in_epoch"] else 0)  # epochs (partly) trained
    old_drop = effective_lr_drop(opts)
    if epochs is not None:
        if epochs < done:
            raise FinetuneError(f"--epochs {epochs} with --resume: the run has already trained {done} epoch(s)")
        opts.epochs = epochs
        follows = effective_lr_drop(opts)
        if opts.lr_drop is None and follows != old_drop and min(follows, old_drop) < done:
            opts.lr_drop = old_drop  # the default drop would move into the past: keep it where it was
    if lr_drop is not None:
        opts.lr_drop = lr_drop
    new_drop = effective_lr_drop(opts)
    if new_drop != old_drop and min(new_drop, old_drop) < done:
        raise FinetuneError(f"--lr-drop {new_drop} with --resume: the learning rate of the {done} epoch(s) "
                            f"already trained would change (it drops after epoch {old_drop})")

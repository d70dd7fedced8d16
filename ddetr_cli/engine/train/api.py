"""``finetune()`` (the Python API) and ``finetune_command()`` (``ddetr finetune``, also under
torchrun): options and resume resolution, the run folder, the process group, registration, and
known errors as one line with an exit code."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ddetr_cli.data.datasets import DatasetError
from ddetr_cli.engine.options import DEFAULT_OUT, FinetuneError, FinetuneOptions
from ddetr_cli.engine.stop import exit_code
from ddetr_cli.engine.train.dist import DistInfo, broadcast, dist_from_env, pick_device
from ddetr_cli.engine.train.loop import FinetuneResult, Trainer, TrainingInterrupted
from ddetr_cli.engine.train.state import extend_schedule, find_resume_state, load_train_state
from ddetr_cli.files import atomic_write_text, next_run_dir
from ddetr_cli.weights.load import WeightsError


def _console(info: DistInfo) -> Any:
    from rich.console import Console

    return Console(quiet=not info.main, highlight=False, soft_wrap=True)


def finetune(data: str | Path | None = None, *, resume: str | None = None, **options: Any) -> FinetuneResult:
    """Fine-tune a model on the dataset folder ``data`` (COCO/YOLO/VOC); see FinetuneOptions.

    ``resume``: a run folder, its ``last.pt``, or "latest" to continue an interrupted run with
    its own options (only ``device``, ``workers``, ``save_period``, ``verbose``, ``max_steps``,
    ``epochs`` and ``lr_drop`` may change, the last two only where the epochs already trained are
    unaffected; a run stopped by ``--max-steps`` or ``--epochs`` continues when given a larger one).
    Raises DatasetError, WeightsError or FinetuneError with one-line messages (TrainingDiverged,
    a FinetuneError, when the loss stays non-finite), and TrainingInterrupted (a
    KeyboardInterrupt) on Ctrl-C after saving the step reached.
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
        state = load_train_state(ckpt)
        saved = state["options"]
        opts = FinetuneOptions(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(FinetuneOptions)}})
        for k in ("device", "workers", "save_period", "verbose", "max_steps"):
            if options.get(k) is not None:
                setattr(opts, k, options[k])
        extend_schedule(opts, state, options.get("epochs"), options.get("lr_drop"))
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
            run_dir = broadcast(next_run_dir(Path(opts.out)) if info.main else None, info)
            trainer.run_dir = run_dir
        if info.main and (state is not None or not (run_dir / "args.json").exists()):
            atomic_write_text(run_dir / "args.json", json.dumps({**asdict(opts), "world_size": info.world}, indent=2))
        for stale in run_dir.glob(".*.tmp*"):  # left by a process killed mid-write
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


def interrupted_message(e: KeyboardInterrupt) -> str:
    """What to say on Ctrl-C: only promise a --resume there is a checkpoint for."""
    if not isinstance(e, TrainingInterrupted):
        return "interrupted before training started; nothing to resume"
    if e.checkpoint is None:
        return "interrupted before the first checkpoint; nothing to resume"
    where = f"step {e.step}" if e.step is not None else "its last checkpoint"
    if e.exact:
        return f"interrupted at step {e.step}, saved: continue with ddetr finetune --resume {e.run_dir}"
    return f"interrupted: ddetr finetune --resume {e.run_dir} continues from {where}"


def finetune_command(data: str | None = None, *, resume: str | None = None, quiet: bool = False,
                     as_json: bool = False, **options: Any) -> int:
    """CLI entry (``ddetr finetune``, also under torchrun): run :func:`finetune` and turn known
    errors into one red line. ``options`` are ``FinetuneOptions`` fields; ``None`` means "not
    given" (the default, or on resume the run's own value). ``resume``: None = fresh run; "latest"
    = newest run under ``out``; else a run folder/last.pt. ``as_json``: the result as one JSON
    object on stdout (rank 0). Returns the exit code: 0 done (or already finished), 2 bad input
    or a diverged run, 130 interrupted (143: by SIGTERM).
    """
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        res = finetune(data, resume=resume, verbose=not (quiet or as_json), **options)
    except (DatasetError, WeightsError, FinetuneError) as e:
        err.print(f"[red]error:[/] {e}")
        return 2
    except KeyboardInterrupt as e:
        err.print(f"[yellow]{interrupted_message(e)}[/]")
        return exit_code(e)  # 130 for Ctrl-C, 143 for SIGTERM
    if as_json and dist_from_env().main:
        print(json.dumps(res.to_dict()))
    return 0

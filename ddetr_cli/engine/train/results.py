"""What a run reports per epoch: results.csv, results.png and the epoch table."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ddetr_cli.engine.train.hooks import HookBase, Trainer
from ddetr_cli.files import atomic_write_text

# results.csv's columns, in order; a run that trains a mask head adds MASK_COLUMNS
COLUMNS = ("epoch", "steps", "loss", "cls", "bbox", "giou", "lr", "AP", "AP50", "AP75", "time")
MASK_COLUMNS = ("mask", "dice", "mask_AP", "mask_AP50")


class ResultsWriter(HookBase):
    """Appends the epoch's row (from ``epoch_log``) to the history; rank 0 rewrites results.csv
    and results.png and prints the epoch table."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def after_epoch(self, trainer: Trainer) -> None:
        row = {k: trainer.epoch_log[k] for k in COLUMNS}
        row.update({k: trainer.epoch_log[k] for k in MASK_COLUMNS if k in trainer.epoch_log})
        self.history.append(row)
        if trainer.info.main:
            write_results(self.history, trainer.run_dir)
            if trainer.o.verbose:
                print_epoch(trainer.console, row, trainer.o.epochs, trainer.epoch_log.get("skipped", 0))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


def write_results(history: list[dict], run_dir: Path) -> None:
    if not history:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    for r in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(run_dir / "results.csv", buf.getvalue())
    try:
        plot_results(history, run_dir / "results.png")
    except ImportError:
        pass  # matplotlib is optional: the CSV has everything


def print_epoch(console: Any, row: dict, epochs: int, skipped: int) -> None:
    from rich.table import Table

    t = Table(title=f"epoch {row['epoch']}/{epochs}", show_edge=False)
    # AP75 and the step count are in results.csv; the table stays within 80 columns.
    for k in ("loss", "cls", "bbox", "giou", "lr", "AP", "AP50", "time"):
        t.add_column(k, justify="right", no_wrap=True)
    t.add_row(*[f"{row['loss']:.4f}", f"{row['cls']:.4f}", f"{row['bbox']:.4f}", f"{row['giou']:.4f}",
                f"{row['lr']:.1e}", f"{row['AP']:.4f}", f"{row['AP50']:.4f}", f"{row['time']:.1f}s"])
    console.print(t)
    if skipped:
        console.print(f"[yellow]skipped {skipped} steps with a non-finite loss[/]")


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
    atomic_write_text(path, buf.getvalue())

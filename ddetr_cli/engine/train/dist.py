"""torchrun's process layout and the few collectives the trainer needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ddetr_cli.engine.options import FinetuneError
from ddetr_cli.engine.predictor import pick_device as detector_pick_device


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


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks take the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())

"""Training data whose every batch is a function of its position (seed, epoch, index), which is
what makes resume exact: the sample order of an epoch is a permutation seeded by (seed, epoch)
and each sample's augmentation uses a generator seeded by (seed, epoch, index)."""

from __future__ import annotations

import math
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ddetr_cli.data.datasets import DatasetError, Record
from ddetr_cli.data.transforms import pad_batch, to_tensor, train_transforms, val_transforms
from ddetr_cli.engine.train.dist import DistInfo


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


def ignore_sigint(worker_id: int) -> None:
    """Worker start-up: Ctrl-C (sent to the whole terminal process group) is the main process's
    to handle; a worker that died of it would fail the batch the trainer finishes before saving."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(ds: TrainSet, batches: list[list[tuple[int, int]]], workers: int, pin: bool) -> DataLoader:
    """A loader over exactly ``batches`` (the rest of an epoch)."""
    # A private generator: creating an iterator must not consume the global torch RNG, whose
    # stream (dropout) has to be identical whether an epoch starts fresh or mid-way on resume.
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=ignore_sigint if workers else None)

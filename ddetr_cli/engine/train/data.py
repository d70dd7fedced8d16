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
    """Indexed by (index, epoch): the augmentation generator is seeded by (seed, epoch, index).

    With ``masks`` the targets also hold each box's instance mask ("masks" (K, H, W) bool over
    the augmented image) and whether it has one ("mask_valid" (K,) bool: a box without a
    segmentation takes no part in the mask loss)."""

    def __init__(self, records: list[Record], imgsz: int, seed: int, train: bool = True, masks: bool = False) -> None:
        self.records, self.seed, self.masks = records, seed, masks
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
            valid = np.zeros(0, bool)
        else:
            boxes, labels = r.boxes.astype(np.float32).reshape(-1, 4), r.labels.astype(np.int64).reshape(-1)
            valid = np.array([bool(s) for s in r.segments[: len(boxes)]] + [False] * (len(boxes) - len(r.segments)), bool)
        sample: tuple = (img, boxes, labels)
        if self.masks:
            # the box index rides along as a label column so that boxes dropped by a crop drop their flag too
            masks = r.masks() if len(boxes) and valid.any() else np.zeros((len(boxes), *img.shape[:2]), bool)
            if masks.shape[1:] != img.shape[:2]:  # annotations made for another size than the file's
                masks = np.zeros((len(boxes), *img.shape[:2]), bool)
                valid[:] = False
            sample = (img, boxes, np.stack([labels, np.arange(len(labels))], 1).reshape(-1, 2), masks)
        out = self.tf(sample, rng)
        if self.masks:
            idx = out[2][:, 1] if len(out[2]) else np.zeros(0, np.int64)
            out = (out[0], out[1], out[2][:, 0] if len(out[2]) else np.zeros(0, np.int64), out[3])
        x, target = to_tensor(out)
        if self.masks:
            target["mask_valid"] = torch.from_numpy(valid[idx].copy())
        target["image_id"] = r.image_id
        target["orig_size"] = (r.height, r.width)
        return x, target


def collate(items: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """-> (images (B, 3, H, W), mask (B, H, W) True on padding, targets); instance masks are
    padded like their images (bottom/right), so they lie over the batch's padded input."""
    images, mask = pad_batch([x for x, _ in items])
    targets = [t for _, t in items]
    for t in targets:
        if "masks" in t:
            m = t["masks"]
            t["masks"] = torch.nn.functional.pad(m, (0, mask.shape[-1] - m.shape[-1], 0, mask.shape[-2] - m.shape[-2]))
    return images, mask, targets


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


def ignore_stop_signals(worker_id: int) -> None:
    """Worker start-up: Ctrl-C (sent to the whole terminal process group) and SIGTERM (sent to the
    job's processes) are the main process's to handle; a worker that died of one would fail the
    batch the trainer finishes before saving. Workers still end with the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(ds: TrainSet, batches: list[list[tuple[int, int]]], workers: int, pin: bool) -> DataLoader:
    """A loader over exactly ``batches`` (the rest of an epoch)."""
    # A private generator: creating an iterator must not consume the global torch RNG, whose
    # stream (dropout) has to be identical whether an epoch starts fresh or mid-way on resume.
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=ignore_stop_signals if workers else None)

"""Image preparation: the one resize rule and normalisation of inference, evaluation and training
(``resize_shape``, ``MEAN``/``STD``, ``preprocess`` for a batch of images), the training
augmentations, and batch collation.

A sample is ``(image (H, W, 3) uint8 RGB, boxes (K, 4) float32 xyxy absolute pixels, labels (K,)
int64)``, with a fourth element ``masks (K, H, W) bool`` when instance masks are trained: every
transform moves the masks with the image and keeps them aligned with the boxes.

Every random transform takes an explicit ``numpy.random.Generator`` so that the
augmentation of a sample depends only on the generator it is given (the training dataset derives
one from (seed, epoch, index)): results are the same with any number of DataLoader workers, and
a resumed run sees exactly the augmentations the interrupted one would have.

The training recipe is the reference one (flip 0.5, then either a multi-scale resize or
resize -> random crop -> multi-scale resize), with every size scaled by ``imgsz / 800``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.nn import functional as F

# ImageNet statistics: the one normalisation of training, validation, eval and inference
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_MEAN, _STD = np.array(MEAN, np.float32), np.array(STD, np.float32)

Sample = tuple[np.ndarray, ...]  # (image, boxes, labels) or (image, boxes, labels, masks)
Transform = Callable[[Sample, np.random.Generator], Sample]


def scaled_sizes(imgsz: int) -> dict[str, list[int] | int]:
    """The reference training sizes (defined for 800) scaled to ``imgsz``."""
    f = imgsz / 800
    return {
        "scales": [max(1, round(s * f)) for s in range(480, 801, 32)],
        "max_size": max(1, round(1333 * f)),
        "crop_resize": [max(1, round(s * f)) for s in (400, 500, 600)],
        "crop_min": max(1, round(384 * f)),
        "crop_max": max(1, round(600 * f)),
    }


def resize_shape(h: int, w: int, size: int = 800, max_size: int | None = 1333) -> tuple[int, int]:
    """Output (h, w): short side ``size`` unless the long side would pass ``max_size``.

    The official recipe: the short side target is lowered (rounded) first when the long side
    would exceed max_size; an image already at the target is left as is.
    """
    if max_size is not None:
        lo, hi = float(min(h, w)), float(max(h, w))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def preprocess(
    images: Sequence[np.ndarray],
    size: int = 800,
    max_size: int | None = 1333,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB uint8 images -> (pixels (B, 3, Hp, Wp) normalised float32, mask (B, Hp, Wp) True on padding).

    Resizing is bilinear with antialiasing (as PIL does for the reference); padding is at the
    bottom/right with zeros.
    """
    tensors = []
    for img in images:
        t = torch.from_numpy(img if img.flags.writeable else img.copy()).to(device).permute(2, 0, 1).float().div_(255.0)
        h, w = img.shape[:2]
        nh, nw = resize_shape(h, w, size, max_size)
        if (nh, nw) != (h, w):
            t = F.interpolate(t[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        mean = torch.tensor(MEAN, device=t.device).view(3, 1, 1)
        std = torch.tensor(STD, device=t.device).view(3, 1, 1)
        tensors.append((t - mean) / std)
    hp = max(t.shape[1] for t in tensors)
    wp = max(t.shape[2] for t in tensors)
    pixels = torch.zeros(len(tensors), 3, hp, wp, device=tensors[0].device)
    mask = torch.ones(len(tensors), hp, wp, dtype=torch.bool, device=tensors[0].device)
    for i, t in enumerate(tensors):
        pixels[i, :, : t.shape[1], : t.shape[2]] = t
        mask[i, : t.shape[1], : t.shape[2]] = False
    return pixels, mask


def _resize_masks(masks: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """(K, H, W) bool -> (K, nh, nw) bool, nearest neighbour (OpenCV takes at most 512 channels)."""
    if not len(masks):
        return np.zeros((0, nh, nw), bool)
    out = [cv2.resize(np.ascontiguousarray(masks[i : i + 256].transpose(1, 2, 0)).astype(np.uint8), (nw, nh),
                      interpolation=cv2.INTER_NEAREST).reshape(nh, nw, -1) for i in range(0, len(masks), 256)]
    return np.concatenate(out, -1).transpose(2, 0, 1).astype(bool)


def resize(sample: Sample, short: int, max_size: int | None) -> Sample:
    img, boxes, labels, *masks = sample
    h, w = img.shape[:2]
    nh, nw = resize_shape(h, w, short, max_size)
    if (nh, nw) == (h, w):
        return sample
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    scale = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    return (img, boxes * scale, labels, *(_resize_masks(m, nh, nw) for m in masks))


def hflip(sample: Sample) -> Sample:
    img, boxes, labels, *masks = sample
    w = img.shape[1]
    boxes = boxes.copy()
    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    return (np.ascontiguousarray(img[:, ::-1]), boxes, labels, *(np.ascontiguousarray(m[:, :, ::-1]) for m in masks))


def crop(sample: Sample, top: int, left: int, h: int, w: int) -> Sample:
    """Crop and clip boxes to the region; boxes left with no area are dropped (with their masks)."""
    img, boxes, labels, *masks = sample
    img = img[top : top + h, left : left + w]
    b = boxes - np.array([left, top, left, top], np.float32)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return (np.ascontiguousarray(img), b[keep], labels[keep],
            *(np.ascontiguousarray(m[keep][:, top : top + h, left : left + w]) for m in masks))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return hflip(sample) if rng.random() < self.p else sample


class RandomResize:
    """Short side to a random choice of ``sizes`` (long side capped at ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return resize(sample, int(self.sizes[rng.integers(len(self.sizes))]), self.max_size)


class RandomSizeCrop:
    """Crop a random region with sides in [min_size, max_size] (bounded by the image).

    Unlike the reference, a crop that would remove every box of an image that has boxes is
    re-drawn (up to ``tries`` times) and otherwise skipped: on small datasets an empty crop is a
    wasted sample.
    """

    def __init__(self, min_size: int, max_size: int, tries: int = 10) -> None:
        self.min_size, self.max_size, self.tries = min_size, max_size, tries

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        img, boxes = sample[0], sample[1]
        ih, iw = img.shape[:2]
        for _ in range(self.tries):
            w = int(rng.integers(min(self.min_size, iw), min(iw, self.max_size) + 1))
            h = int(rng.integers(min(self.min_size, ih), min(ih, self.max_size) + 1))
            top = int(rng.integers(0, ih - h + 1))
            left = int(rng.integers(0, iw - w + 1))
            out = crop(sample, top, left, h, w)
            if len(out[1]) or not len(boxes):
                return out
        return sample


class RandomSelect:
    """Apply ``a`` with probability ``p``, else ``b``."""

    def __init__(self, a: Transform, b: Transform, p: float = 0.5) -> None:
        self.a, self.b, self.p = a, b, p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return self.a(sample, rng) if rng.random() < self.p else self.b(sample, rng)


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample


def train_transforms(imgsz: int = 800) -> Compose:
    """The reference training augmentation scaled to ``imgsz`` (800 gives the reference sizes)."""
    s = scaled_sizes(imgsz)
    return Compose([
        RandomHorizontalFlip(0.5),
        RandomSelect(
            RandomResize(s["scales"], s["max_size"]),
            Compose([
                RandomResize(s["crop_resize"]),
                RandomSizeCrop(s["crop_min"], s["crop_max"]),
                RandomResize(s["scales"], s["max_size"]),
            ]),
        ),
    ])


def val_transforms(imgsz: int = 800) -> Compose:
    """Deterministic resize: short side ``imgsz``, long side at most ``imgsz * 1333 / 800``."""
    s = scaled_sizes(imgsz)
    return Compose([RandomResize([imgsz], s["max_size"])])


def to_tensor(sample: Sample) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (image (3, H, W) float32 normalised, {"labels" (K,), "boxes" (K, 4) cxcywh in [0, 1]},
    plus "masks" (K, H, W) bool when the sample has masks)."""
    img, boxes, labels, *masks = sample
    h, w = img.shape[:2]
    x = torch.from_numpy(((img.astype(np.float32) / 255.0 - _MEAN) / _STD).transpose(2, 0, 1).copy())
    b = boxes.astype(np.float32).reshape(-1, 4) / np.array([w, h, w, h], np.float32)
    cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
    target = {"labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
              "boxes": torch.from_numpy(cxcywh.astype(np.float32)).reshape(-1, 4)}
    if masks:
        target["masks"] = torch.from_numpy(np.ascontiguousarray(masks[0], dtype=bool)).reshape(-1, h, w)
    return x, target


def pad_batch(images: Sequence[torch.Tensor], divisor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad images (3, H_i, W_i) bottom/right with zeros to a common size.

    -> (batch (B, 3, H, W), mask (B, H, W) bool True on padding). ``divisor`` rounds H, W up.
    """
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    h, w = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    batch = images[0].new_zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return batch, mask

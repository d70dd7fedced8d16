"""Panoptic merging: DETR's per-query masks -> one segment map per image, each pixel in at most
one segment (``ddetr detect --panoptic``, ``video --panoptic``, ``eval --panoptic``).

The rule is the reference post-processing as transformers' ``post_process_panoptic_segmentation``
has it: queries whose best class (softmax over C+1) is a real class scoring above ``threshold``
are kept (Deformable DETR, without a "no object" class: those whose best sigmoid class
score is); their mask probabilities (sigmoid), resized to the image and weighted by the score,
compete per pixel (argmax); a query keeps the pixels it won only if they are more than
``overlap`` of its own mask (probability >= ``mask_threshold``), which drops fragments of
masks buried under others; every query of one stuff class joins a single segment. A model
without stuff classes (things only) leaves the pixels no mask claims (probability below
``mask_threshold``) out of every segment, where the reference would give them to the best query.

Unlike the reference, the padding of a batch is cut away before resizing (the reference resizes
the padded mask to the image), so an image gets the same map alone or in a padded batch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ddetr_cli.formats.panoptic import Panoptic, Segment

# The reference's panoptic defaults: DETR's panoptic evaluation keeps queries above 0.85.
PANOPTIC_THRESHOLD = 0.85
MASK_THRESHOLD = 0.5
OVERLAP_THRESHOLD = 0.8
_CHUNK = 16  # queries resized at a time: full-size float maps of 100 queries would be ~0.4 GB


def _resized_probs(masks: torch.Tensor, padded_hw: tuple[int, int], valid_hw: tuple[int, int],
                   size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) mask logits over the padded input -> (K, H, W) probabilities over the image.

    One bilinear resize: the padded map is scaled so that its valid part lands on ``size``, then
    cropped (without padding this is a plain resize to ``size``, as the reference does)."""
    (hp, wp), (vh, vw), (h, w) = padded_hw, valid_hw, size
    full = (max(h, round(h * hp / vh)), max(w, round(w * wp / vw)))
    probs = masks.float().sigmoid()[None]
    return F.interpolate(probs, size=full, mode="bilinear", align_corners=False)[0, :, :h, :w]


@torch.no_grad()
def merge_panoptic(
    logits: torch.Tensor,
    masks: torch.Tensor,
    size: tuple[int, int],
    stuff_labels: Collection[int] = (),
    *,
    padded_hw: tuple[int, int] | None = None,
    valid_hw: tuple[int, int] | None = None,
    threshold: float = PANOPTIC_THRESHOLD,
    mask_threshold: float = MASK_THRESHOLD,
    overlap: float = OVERLAP_THRESHOLD,
    classes: Sequence[int] | None = None,
    no_object: bool = True,
) -> Panoptic:
    """One image's DETR outputs -> its panoptic segmentation (see the module docstring).

    logits (Q, C+1) with "no object" last (DETR, softmax) or, with ``no_object=False``, (Q, C)
    sigmoid logits (Deformable DETR: a query's score is its best class's probability); masks (Q, h, w) mask logits over the padded input of
    size ``padded_hw`` (default: the image fills it) whose resized image is ``valid_hw``; ``size``
    the original (H, W). ``classes``: only these labels may form segments. -> ``Panoptic`` with a
    (H, W) int32 map (segment ids 1, 2, ...; 0 = no segment) and its segments in id order.
    """
    h, w = size
    num_classes = logits.shape[-1] - (1 if no_object else 0)
    if no_object:
        scores, labels = logits.float().softmax(-1).max(-1)
    else:
        scores, labels = logits.float().sigmoid().max(-1)
    keep = (labels < num_classes) & (scores > threshold)
    if classes is not None:
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[[c for c in classes if 0 <= c < num_classes]] = True
        keep &= allowed[labels]
    idx = torch.nonzero(keep).flatten()
    if idx.numel() == 0:
        return Panoptic(np.zeros((h, w), np.int32), [])
    padded_hw = padded_hw or tuple(masks.shape[-2:])
    valid_hw = valid_hw or padded_hw
    best_val = best_idx = None
    own_area = torch.zeros(len(idx), dtype=torch.int64)
    for start in range(0, len(idx), _CHUNK):
        part = idx[start : start + _CHUNK]
        probs = _resized_probs(masks[part], padded_hw, valid_hw, size) * scores[part][:, None, None]
        own_area[start : start + len(part)] = (probs >= mask_threshold).flatten(1).sum(1).cpu()
        val, arg = probs.max(0)
        arg = arg + start
        if best_val is None:
            best_val, best_idx = val, arg
        else:  # strictly greater: on ties the earlier query wins, as one argmax over all would
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, arg, best_idx)
    stuff = set(int(s) for s in stuff_labels)
    if not stuff:
        # Without stuff classes no query is meant to cover the background, yet the argmax hands
        # every pixel to some query (the reference assumes stuff covers the rest): a pixel whose
        # winning mask probability is below ``mask_threshold`` belongs to no segment here.
        void = best_val < mask_threshold * scores[idx][best_idx]
        best_idx = torch.where(void, torch.full_like(best_idx, len(idx)), best_idx)
    won = torch.bincount(best_idx.flatten(), minlength=len(idx) + 1)[: len(idx)].cpu()
    seg_of = np.zeros(len(idx), np.int32)
    segments: list[Segment] = []
    stuff_segment: dict[int, int] = {}
    labels_k, scores_k = labels[idx].tolist(), scores[idx].tolist()
    for k in range(len(idx)):
        if won[k] == 0 or own_area[k] == 0 or not (won[k] / own_area[k]).item() > overlap:
            continue
        label = labels_k[k]
        if label in stuff_segment:
            seg_of[k] = stuff_segment[label]
            continue
        seg_of[k] = len(segments) + 1
        segments.append(Segment(id=int(seg_of[k]), label=label, score=float(scores_k[k])))
        if label in stuff:
            stuff_segment[label] = int(seg_of[k])
    segmap = np.append(seg_of, 0)[best_idx.cpu().numpy()]  # index len(idx): no segment
    return Panoptic(segmap.astype(np.int32), segments)

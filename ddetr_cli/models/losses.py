"""Training losses of Deformable DETR (and DETR: softmax CE, see DETRCriterion): sigmoid focal classification, L1 and GIoU box losses on
Hungarian-matched pairs, for the final decoder layer, every auxiliary layer and (two-stage) the
encoder proposals; with DETR's mask head, focal and dice losses on the matched masks of the
final layer (``mask_losses``).

All terms are sums normalised by the number of target boxes in the (global) batch, so an image
without boxes only contributes "no object" classification terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.matcher import HungarianMatcher, box_area, box_cxcywh_to_xyxy


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Element-wise focal loss (Lin et al., 2017) with sigmoid probabilities.

    logits, targets (...) of the same shape, targets in {0, 1} -> loss (...)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of corresponding boxes. a, b (N, 4) xyxy -> (N,)."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    # The clamps only matter for degenerate (zero-size) boxes, which would otherwise give 0/0.
    return inter / union.clamp(min=1e-12) - (hull - union) / hull.clamp(min=1e-12)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DETR's dice loss per mask: 1 - (2 |p t| + 1) / (|p| + |t| + 1) with p = sigmoid(logits).

    logits, targets (N, P) (P pixels per mask) -> (N,)."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(1) + 1) / (p.sum(1) + targets.sum(1) + 1)


def mask_losses(pred: torch.Tensor | Callable[[int, torch.Tensor], torch.Tensor], targets: list[dict],
                indices: list[tuple[torch.Tensor, torch.Tensor]], num_boxes: float) -> dict[str, torch.Tensor]:
    """DETR's mask terms on the matched pairs, at the resolution the head predicts.

    pred (B, Q, h, w) mask logits over the padded batch, or a function (image b, query indices
    (K,)) -> (K, h, w) of them (``models.masks.MaskSource``: only the matched queries' masks); ``targets[b]["masks"]`` (K_b, Hp, Wp)
    bool over the same padded input, ``"mask_valid"`` (K_b,) which boxes have a mask. The target
    masks are reduced to (h, w) by area averaging and thresholded at 0.5 (instead of the
    reference's upsampling of the prediction to the input size: the same supervision at a
    sixteenth of the cost). -> {"mask": focal loss (mean over pixels, summed over masks),
    "dice"}, each divided by ``num_boxes``."""
    srcs, tgts = [], []
    for b, (qi, ti) in enumerate(indices):
        t = targets[b]
        if "masks" not in t or not len(ti):
            continue
        ti = ti.to(t["masks"].device)
        valid = t.get("mask_valid", torch.ones(len(t["masks"]), dtype=torch.bool, device=ti.device))[ti]
        if not valid.any():
            continue
        chosen = qi[valid.to(qi.device)]
        src = pred(b, chosen) if callable(pred) else pred[b, chosen.to(pred.device)]
        m = t["masks"][ti[valid]].float()[None]
        small = F.interpolate(m, size=src.shape[-2:], mode="area")[0] > 0.5
        srcs.append(src)
        tgts.append(small.to(src.device))
    if not srcs:
        if callable(pred):  # no matched mask: an empty query set keeps the head in the graph
            zero = pred(0, torch.zeros(1, dtype=torch.long)).sum() * 0.0
        else:
            zero = pred.sum() * 0.0  # keeps the graph (DDP expects every parameter used)
        return {"mask": zero, "dice": zero}
    src = torch.cat(srcs).flatten(1).float()
    tgt = torch.cat(tgts).flatten(1).float()
    return {"mask": sigmoid_focal_loss(src, tgt).mean(1).sum() / num_boxes,
            "dice": dice_loss(src, tgt).sum() / num_boxes}


def global_num_boxes(targets: list[dict], device: torch.device) -> float:
    """Number of target boxes per process, averaged over DDP ranks (>= 1), so every rank
    normalises by the same value and the summed gradients equal a single big batch's."""
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(float(n.item()), 1.0)


class SetCriterion(nn.Module):
    """Matches predictions to targets and computes the weighted loss.

    forward(outputs, targets, num_boxes=None) with ``outputs`` as returned by ``DeformableDETR``
    (logits (B, Q, C), boxes (B, Q, 4), aux [...], enc {...}) and ``targets[b]`` =
    {"labels" (K_b,) int64, "boxes" (K_b, 4) cxcywh normalised}. Returns a dict of scalar
    tensors: ``loss`` (the weighted total to back-propagate) and the unweighted terms
    ``cls``, ``bbox``, ``giou`` (final layer), ``cls_i``/``bbox_i``/``giou_i`` (aux layer i),
    ``cls_enc``/``bbox_enc``/``giou_enc`` (two-stage) and, when the outputs have ``masks`` (B, Q,
    h, w) and the targets "masks" (K_b, Hp, Wp) over the padded input, ``mask`` and ``dice``.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None, *, w_cls: float = 2.0,
                 w_bbox: float = 5.0, w_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        # mask and dice: DETR's mask_loss_coef and dice_loss_coef
        self.weights = {"cls": w_cls, "bbox": w_bbox, "giou": w_giou, "mask": 1.0, "dice": 1.0}
        self.alpha, self.gamma = alpha, gamma

    def _terms(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict], num_boxes: float,
               indices: list | None = None) -> dict[str, torch.Tensor]:
        """logits (B, Q, C), boxes (B, Q, 4) -> {"cls", "bbox", "giou"} for one prediction set."""
        if indices is None:
            indices = self.matcher(logits, boxes, targets)
        b_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(logits.device)
        q_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        labels = torch.cat([t["labels"][ti.to(t["labels"].device)] for t, (_, ti) in zip(targets, indices)]).to(logits.device)
        tboxes = torch.cat([t["boxes"][ti.to(t["boxes"].device)] for t, (_, ti) in zip(targets, indices)]).to(boxes.device)

        cls = self._class_loss(logits, b_idx, q_idx, labels, num_boxes)

        pred = boxes[b_idx, q_idx].float()
        tboxes = tboxes.float()
        bbox = F.l1_loss(pred, tboxes, reduction="sum") / num_boxes
        giou = (1 - paired_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tboxes))).sum() / num_boxes
        return {"cls": cls, "bbox": bbox, "giou": giou}

    def _class_loss(self, logits: torch.Tensor, b_idx: torch.Tensor, q_idx: torch.Tensor, labels: torch.Tensor,
                    num_boxes: float) -> torch.Tensor:
        """Focal loss over every (query, class), positives at the matched (b_idx, q_idx, labels)."""
        onehot = torch.zeros_like(logits, dtype=torch.float32)
        onehot[b_idx, q_idx, labels] = 1.0
        return sigmoid_focal_loss(logits.float(), onehot, self.alpha, self.gamma).sum() / num_boxes

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        if num_boxes is None:
            num_boxes = global_num_boxes(targets, outputs["logits"].device)
        indices = self.matcher(outputs["logits"], outputs["boxes"], targets)
        losses: dict[str, torch.Tensor] = dict(self._terms(outputs["logits"], outputs["boxes"], targets, num_boxes, indices))
        pred_masks = outputs.get("masks", outputs.get("mask_source"))
        if pred_masks is not None and any("masks" in t for t in targets):
            losses.update(mask_losses(pred_masks, targets, indices, num_boxes))
        for i, aux in enumerate(outputs.get("aux") or []):
            for k, v in self._terms(aux["logits"], aux["boxes"], targets, num_boxes).items():
                losses[f"{k}_{i}"] = v
        if "enc" in outputs:
            # Encoder proposals are class-agnostic: every box is "object" (class 0).
            binary = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            enc = outputs["enc"]
            for k, v in self._terms(enc["logits"], enc["boxes"], binary, num_boxes).items():
                losses[f"{k}_enc"] = v
        losses["loss"] = sum(self.weights[k.split("_")[0]] * v for k, v in losses.items())
        return losses


class DETRCriterion(SetCriterion):
    """DETR's loss: softmax cross-entropy over C+1 classes (the unmatched queries' target is the
    last, "no object", class, weighted ``eos_coef``), L1 and GIoU on matched boxes, with the
    matcher costing -p(class) instead of the focal cost.

    The cross-entropy is the weighted mean over all queries, as in the reference (not divided by
    the number of boxes); the box terms are normalised as in :class:`SetCriterion`.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None, *, w_cls: float = 1.0,
                 w_bbox: float = 5.0, w_giou: float = 2.0, eos_coef: float = 0.1) -> None:
        super().__init__(num_classes, matcher or HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, softmax=True),
                         w_cls=w_cls, w_bbox=w_bbox, w_giou=w_giou)
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef
        self.register_buffer("class_weight", weight)

    def _class_loss(self, logits: torch.Tensor, b_idx: torch.Tensor, q_idx: torch.Tensor, labels: torch.Tensor,
                    num_boxes: float) -> torch.Tensor:
        target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target[b_idx, q_idx] = labels
        return F.cross_entropy(logits.float().transpose(1, 2), target, self.class_weight.to(logits.device))


def build_criterion(cfg: ModelConfig) -> SetCriterion:
    """The training loss of the model family ``cfg.arch`` describes, with its reference weights."""
    if cfg.arch == "detr":
        return DETRCriterion(cfg.num_classes)
    return SetCriterion(cfg.num_classes, HungarianMatcher())

"""Box helpers and the Hungarian matcher that pairs predictions with ground-truth boxes.

Boxes are (cx, cy, w, h) normalised to the unpadded image unless a name says ``xyxy``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...)."""
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (N, 4), b (M, 4) xyxy -> (IoU (N, M), union (N, M))."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union, union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU. a (N, 4), b (M, 4) xyxy with x2 >= x1, y2 >= y1 -> (N, M) in [-1, 1]."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Matching cost of the focal loss: for every (query, target) the focal loss of predicting
    the target's class positive minus that of predicting it negative.

    logits (N, C), labels (M,) int64 -> (N, M).
    """
    p = logits.sigmoid()
    # -log(p) and -log(1-p) via logsigmoid for stability at saturated logits.
    neg_log_p = -torch.nn.functional.logsigmoid(logits)
    neg_log_not_p = -torch.nn.functional.logsigmoid(-logits)
    pos = alpha * (1 - p) ** gamma * neg_log_p
    neg = (1 - alpha) * p**gamma * neg_log_not_p
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    ``w_class * focal_cost + w_bbox * L1(cxcywh) - w_giou * GIoU`` (scipy ``linear_sum_assignment``);
    with ``softmax`` (DETR) the class cost is ``-p(label)`` instead of the focal cost.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0, softmax: bool = False) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma
        self.softmax = softmax  # DETR: class cost -p(label) under a softmax over C+1 logits

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, tboxes: torch.Tensor) -> torch.Tensor:
        """logits (Q, C), boxes (Q, 4), labels (K,), tboxes (K, 4) -> cost (Q, K) float32."""
        logits, boxes, tboxes = logits.float(), boxes.float(), tboxes.float()
        if self.softmax:
            c_cls = -logits.softmax(-1)[:, labels]
        else:
            c_cls = focal_class_cost(logits, labels, self.alpha, self.gamma)
        c_l1 = torch.cdist(boxes, tboxes, p=1)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tboxes))
        return self.cost_bbox * c_l1 + self.cost_class * c_cls + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """logits (B, Q, C), boxes (B, Q, 4); targets[b] = {"labels" (K_b,), "boxes" (K_b, 4)}.

        Returns per image (query_idx (n,), target_idx (n,)) int64 on CPU, n = min(Q, K_b);
        images without targets give two empty tensors.
        """
        out = []
        for b, t in enumerate(targets):
            k = len(t["labels"])
            if k == 0:
                empty = torch.empty(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            c = self.cost_matrix(logits[b], boxes[b], t["labels"], t["boxes"]).cpu()
            # NaN/inf would make scipy raise; a diverged prediction should cost the most, not crash.
            c = torch.nan_to_num(c, nan=1e8, posinf=1e8, neginf=-1e8)
            qi, ti = linear_sum_assignment(c.numpy())
            out.append((torch.as_tensor(qi, dtype=torch.int64), torch.as_tensor(ti, dtype=torch.int64)))
        return out


def assignment_cost(cost: np.ndarray, query_idx: np.ndarray, target_idx: np.ndarray) -> float:
    """Total cost of an assignment; cost (Q, K)."""
    return float(cost[query_idx, target_idx].sum())

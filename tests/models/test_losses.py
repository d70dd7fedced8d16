"""Matcher against brute force, focal/GIoU against direct formulas, and gradients through the criterion."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ddetr_cli.models.losses import SetCriterion, paired_giou, sigmoid_focal_loss
from ddetr_cli.models.matcher import HungarianMatcher, box_cxcywh_to_xyxy, generalized_box_iou


def _random_boxes(g: torch.Generator, n: int) -> torch.Tensor:
    """(n, 4) cxcywh boxes inside the unit square."""
    wh = torch.rand(n, 2, generator=g) * 0.4 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    return torch.cat([c, wh], -1)


def _giou_direct(a: list[float], b: list[float]) -> float:
    """GIoU of two xyxy boxes written out with plain floats."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    union = area_a + area_b - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


@pytest.mark.parametrize("seed", range(12))
def test_matcher_equals_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, c = 5, 3
    k = int(torch.randint(0, 5, (1,), generator=g))  # 0..4 targets, including none and k == q-1
    logits = torch.randn(1, q, c, generator=g) * 2
    boxes = _random_boxes(g, q)[None]
    target = {"labels": torch.randint(0, c, (k,), generator=g), "boxes": _random_boxes(g, k)}
    m = HungarianMatcher()
    (qi, ti), = m(logits, boxes, [target])
    assert len(qi) == len(ti) == k
    if k == 0:
        return
    cost = m.cost_matrix(logits[0], boxes[0], target["labels"], target["boxes"]).double().numpy()
    best = min(sum(cost[p[j], j] for j in range(k)) for p in itertools.permutations(range(q), k))
    assert cost[qi.numpy(), ti.numpy()].sum() == pytest.approx(best, abs=1e-9)
    assert len(set(qi.tolist())) == k and sorted(ti.tolist()) == list(range(k))


def test_matcher_cost_terms_direct() -> None:
    """Cost = 5 L1 + 2 focal-cost - 2 GIoU, checked entry by entry with scalar math."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, generator=g)
    boxes, tboxes = _random_boxes(g, 3), _random_boxes(g, 2)
    labels = torch.tensor([1, 0])
    cost = HungarianMatcher().cost_matrix(logits, boxes, labels, tboxes)
    for i in range(3):
        for j in range(2):
            p = 1 / (1 + math.exp(-float(logits[i, labels[j]])))
            focal = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
            l1 = float((boxes[i] - tboxes[j]).abs().sum())
            giou = _giou_direct(box_cxcywh_to_xyxy(boxes[i]).tolist(), box_cxcywh_to_xyxy(tboxes[j]).tolist())
            assert float(cost[i, j]) == pytest.approx(5 * l1 + 2 * focal - 2 * giou, rel=1e-5, abs=1e-5)


def test_focal_loss_direct_formula() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, generator=g) * 3
    t = (torch.rand(50, generator=g) > 0.7).float()
    got = sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0)
    for xi, ti, li in zip(x.tolist(), t.tolist(), got.tolist()):
        p = 1 / (1 + math.exp(-xi))
        want = -0.25 * (1 - p) ** 2 * math.log(p) if ti == 1 else -0.75 * p**2 * math.log(1 - p)
        assert li == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_giou_direct() -> None:
    g = torch.Generator().manual_seed(3)
    a = box_cxcywh_to_xyxy(_random_boxes(g, 6))
    b = box_cxcywh_to_xyxy(_random_boxes(g, 6))
    pair = paired_giou(a, b)
    full = generalized_box_iou(a, b)
    for i in range(6):
        assert float(pair[i]) == pytest.approx(_giou_direct(a[i].tolist(), b[i].tolist()), abs=1e-5)
        for j in range(6):
            assert float(full[i, j]) == pytest.approx(_giou_direct(a[i].tolist(), b[j].tolist()), abs=1e-5)
    assert float(paired_giou(a[:1], a[:1])) == pytest.approx(1.0, abs=1e-6)  # identical boxes


def _outputs(g: torch.Generator, b: int, q: int, c: int, aux: int, enc: bool) -> dict:
    def one() -> dict:
        return {"logits": torch.randn(b, q, c, generator=g).requires_grad_(),
                "boxes": _random_boxes(g, b * q).view(b, q, 4).requires_grad_()}
    out = one()
    out["aux"] = [one() for _ in range(aux)]
    if enc:
        out["enc"] = one()
    return out


def test_criterion_terms_and_gradients() -> None:
    g = torch.Generator().manual_seed(4)
    out = _outputs(g, 2, 6, 3, aux=2, enc=True)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": _random_boxes(g, 2)},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]  # empty image
    crit = SetCriterion(num_classes=3)
    losses = crit(out, targets)
    for suffix in ("", "_0", "_1", "_enc"):
        for k in ("cls", "bbox", "giou"):
            assert torch.isfinite(losses[k + suffix])
    total = sum(crit.weights[k.split("_")[0]] * v for k, v in losses.items() if k != "loss")
    assert float(losses["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-6)
    losses["loss"].backward()
    for part in [out, *out["aux"], out["enc"]]:
        assert part["logits"].grad is not None and part["logits"].grad.abs().sum() > 0
        assert part["boxes"].grad is not None and part["boxes"].grad[0].abs().sum() > 0
        assert torch.all(part["boxes"].grad[1] == 0)  # the empty image has no box terms


def test_criterion_all_images_empty() -> None:
    g = torch.Generator().manual_seed(5)
    out = _outputs(g, 2, 4, 2, aux=1, enc=False)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = SetCriterion(num_classes=2)(out, [empty, dict(empty)])
    losses_d = {k: float(v.detach()) for k, v in losses.items()}
    assert losses_d["bbox"] == 0 and losses_d["giou"] == 0 and losses_d["cls"] > 0
    losses["loss"].backward()
    assert torch.isfinite(out["logits"].grad).all()


def test_criterion_perfect_prediction_has_small_box_loss() -> None:
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]])
    logits = torch.full((1, 3, 2), -8.0)
    logits[0, 0, 1] = logits[0, 2, 0] = 8.0
    pred = torch.stack([boxes[0], torch.tensor([0.5, 0.5, 0.1, 0.1]), boxes[1]])[None]
    losses = SetCriterion(num_classes=2)({"logits": logits, "boxes": pred},
                                         [{"labels": torch.tensor([1, 0]), "boxes": boxes}])
    assert float(losses["bbox"]) < 1e-6 and float(losses["giou"]) < 1e-5 and float(losses["cls"]) < 1e-3  # no grad here
    assert np.isfinite(float(losses["loss"]))

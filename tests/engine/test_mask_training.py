"""Mask training: DETR's mask losses against transformers' (``loss_masks``), masks carried through
the training augmentations, and a short fine-tune that trains the mask head (or keeps it)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ddetr_cli.data.transforms import train_transforms
from ddetr_cli.models.losses import DETRCriterion

ROOT = Path(__file__).resolve().parents[2]


def test_mask_losses_match_transformers():
    """Targets given at the head's resolution (where our area reduction is the identity):
    focal and dice terms equal transformers' ImageLoss ``loss_mask`` / ``loss_dice``."""
    pytest.importorskip("transformers")
    from transformers.loss.loss_for_object_detection import HungarianMatcher as HFMatcher
    from transformers.loss.loss_for_object_detection import ImageLoss

    g = torch.Generator().manual_seed(0)
    b, q, c, h, w = 2, 7, 3, 12, 16
    logits = torch.randn(b, q, c + 1, generator=g) * 2
    boxes = torch.rand(b, q, 4, generator=g) * 0.4 + 0.2
    masks = torch.randn(b, q, h, w, generator=g) * 3
    targets = []
    for k in (3, 2):
        m = torch.zeros(k, h, w, dtype=torch.bool)
        for i in range(k):
            y, x = torch.randint(0, h - 4, (1,), generator=g).item(), torch.randint(0, w - 4, (1,), generator=g).item()
            m[i, y : y + 4 + i, x : x + 5] = True
        targets.append({"labels": torch.randint(0, c, (k,), generator=g), "boxes": torch.rand(k, 4, generator=g) * 0.4 + 0.2,
                        "masks": m})
    ours = DETRCriterion(c)({"logits": logits, "boxes": boxes, "masks": masks}, targets)
    ref = ImageLoss(HFMatcher(class_cost=1, bbox_cost=5, giou_cost=2), num_classes=c, eos_coef=0.1,
                    losses=["labels", "boxes", "masks"])(
        {"logits": logits, "pred_boxes": boxes, "pred_masks": masks},
        [{"class_labels": t["labels"], "boxes": t["boxes"], "masks": t["masks"].float()} for t in targets])
    assert ours["mask"].item() == pytest.approx(ref["loss_mask"].item(), rel=1e-5)
    assert ours["dice"].item() == pytest.approx(ref["loss_dice"].item(), rel=1e-5)
    assert ours["mask"].item() > 0.01 and ours["dice"].item() > 0.1
    # a box without a segmentation takes no part
    targets[0]["mask_valid"] = torch.tensor([True, False, True])
    part = DETRCriterion(c)({"logits": logits, "boxes": boxes, "masks": masks}, targets)
    assert part["dice"].item() < ours["dice"].item()


def test_augmentations_keep_masks_on_their_boxes():
    """Each box stays the tight box of its mask through flips, resizes and crops (edges within 3
    pixels: nearest-neighbour resizing moves a mask's edges by up to a pixel of the coarser grid,
    twice on the crop path)."""
    rng = np.random.default_rng(0)
    tf = train_transforms(256)
    for trial in range(20):
        h, w = 240, 320
        masks = np.zeros((4, h, w), bool)
        boxes = []
        for i in range(4):
            x, y = rng.integers(0, w - 60), rng.integers(0, h - 60)
            bw, bh = rng.integers(10, 60), rng.integers(10, 60)
            masks[i, y : y + bh, x : x + bw] = True
            boxes.append([x, y, x + bw, y + bh])
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        labels = np.arange(4)
        out = tf((img, np.array(boxes, np.float32), labels, masks), np.random.default_rng(trial))
        img2, b2, l2, m2 = out
        assert m2.shape == (len(b2), *img2.shape[:2]) and len(l2) == len(b2)
        for box, m in zip(b2, m2):
            ys, xs = np.nonzero(m)
            tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
            assert np.abs(tight - box).max() <= 3.0, (trial, box, tight)


def _tiny_start(path: Path) -> Path:
    from ddetr_cli.data.synth import CLASS_NAMES
    from ddetr_cli.models.build import build_model
    from ddetr_cli.models.config import ModelConfig
    from ddetr_cli.weights.load import save_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_variant("detr", masks=True, num_classes=5, class_names=list(CLASS_NAMES), backbone_depth=18,
                                   d_model=64, nheads=8, enc_layers=1, dec_layers=1, dim_feedforward=128, num_queries=10)
    return save_model(build_model(cfg), path)


@pytest.mark.slow
def test_short_mask_finetune(tmp_path):
    """From a mask-head DETR on the synthetic COCO examples (polygons): the mask head trains (its
    weights move, mask and dice losses are logged and fall), and --no-train-masks keeps it."""
    from ddetr_cli.engine.trainer import finetune
    from ddetr_cli.weights.load import load_model

    start = _tiny_start(tmp_path / "start.safetensors")
    data = ROOT / "examples" / "data" / "coco"
    common = dict(model=str(start), imgsz=96, batch=4, workers=0, epochs=3, max_steps=6, register=False, verbose=False,
                  ema=False, lr=1e-3)
    res = finetune(data, out=str(tmp_path / "runs"), **common)
    hist = res.history
    assert all(k in hist[0] for k in ("mask", "dice", "mask_AP"))
    assert hist[-1]["mask"] + hist[-1]["dice"] < hist[0]["mask"] + hist[0]["dice"]
    m0, m1 = load_model(start), load_model(res.last)
    assert not torch.equal(m0.mask_head.out_lay.weight, m1.mask_head.out_lay.weight)
    frozen = finetune(data, out=str(tmp_path / "runs_frozen"), train_masks=False, **{**common, "max_steps": 2, "epochs": 1})
    assert "mask" not in frozen.history[0] and "mask_AP" in frozen.history[0]
    assert torch.equal(m0.mask_head.out_lay.weight, load_model(frozen.last).mask_head.out_lay.weight)


@pytest.mark.slow
def test_mask_head_on_the_demo_detector_trains_alone(tmp_path):
    """``--arch masks=true --freeze-boxes`` on the bundled demo detector (Deformable DETR): a new
    mask head is added and trained (mask + dice fall from the first epoch to the last), and every
    tensor of the detector stays bit-identical to the demo file's."""
    from ddetr_cli.engine.trainer import finetune
    from ddetr_cli.weights.load import load_model, read_weights

    data = ROOT / "examples" / "data" / "coco"
    res = finetune(data, model="demo", arch=["masks=true"], freeze_boxes=True, imgsz=128, batch=4, workers=0, epochs=3,
                   max_steps=8, register=False, verbose=False, ema=False, lr=2e-3, out=str(tmp_path / "runs"))
    hist = res.history
    assert len(hist) == 2 and all(k in hist[0] for k in ("mask", "dice", "mask_AP"))
    assert hist[-1]["mask"] + hist[-1]["dice"] < hist[0]["mask"] + hist[0]["dice"]
    trained = load_model(res.last)
    assert trained.cfg.masks and trained.cfg.arch == "deformable-detr"
    assert trained.cfg.mask_attention == "scaled"  # a new head's maps enter scaled (models.masks.MHAttentionMap)
    _, demo, _ = read_weights(ROOT / "weights" / "demo.safetensors")
    own = trained.state_dict()
    assert [k for k, v in demo.items() if not torch.equal(own[k], v)] == []


@pytest.mark.parametrize("model,arch,error", [
    ("tiny", ["mask_attention=scaled"], "trained with softmax maps; only a new head can choose"),
    ("demo", ["mask_attention=softmax"], "applies to a new mask head: add --arch masks=true"),
    ("demo", ["masks=true", "mask_attention=sharp"], "mask_attention must be one of softmax, scaled"),
    ("demo", ["masks=true", "d_model=64"], "--arch only applies to a new model"),
])
def test_mask_attention_is_chosen_for_a_new_head_only(tmp_path, model, arch, error):
    """--arch mask_attention goes with a new mask head; a trained head keeps the maps it learnt on."""
    from ddetr_cli.engine.options import FinetuneError
    from ddetr_cli.engine.trainer import finetune

    start = str(_tiny_start(tmp_path / "tiny.safetensors")) if model == "tiny" else model
    with pytest.raises(FinetuneError, match=re.escape(error)):
        finetune(ROOT / "examples" / "data" / "coco", model=start, arch=arch, imgsz=64, batch=2, workers=0, epochs=1,
                 max_steps=1, register=False, verbose=False, out=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))

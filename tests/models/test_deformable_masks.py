"""Deformable DETR with DETR's mask head (``cfg.masks``): it builds and forwards for the variants,
the bundled demo detector loads into it with only the head new, and a mask-head add-on file
(``weights.load.save_mask_head``) reads back as the whole model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ddetr_cli.models.build import build_model
from ddetr_cli.models.masks import MASK_HEAD_PREFIXES
from ddetr_cli.weights.common import WeightsError, alias_groups, load_state_dict_strict
from ddetr_cli.weights.load import read_weights, save_mask_head

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "weights" / "demo.safetensors"


def _demo_with_head() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    cfg, sd, _ = read_weights(DEMO)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, masks=True))
    load_state_dict_strict(model, sd, source=str(DEMO), new_mask_head=True)
    return model.eval(), sd


@pytest.mark.parametrize("variant,levels", [("box-refine", 4), ("single-scale", 1), ("two-stage", 4)])
def test_masks_shape_and_padding(variant, levels):
    """Masks (B, Q, H/4, W/4) over the padded input, finite with padding in the batch; the head
    attends over the level C5 feeds (stride 32)."""
    from ddetr_cli.models.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.from_variant(variant, masks=True, num_classes=3, backbone_depth=18, backbone_width=16, d_model=64,
                                   nheads=8, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=7,
                                   num_feature_levels=levels)
    model = build_model(cfg).eval()
    assert model.mask_level == (0 if levels == 1 else 2)
    images = torch.randn(2, 3, 128, 160)
    pad = torch.zeros(2, 128, 160, dtype=torch.bool)
    pad[1, :, 96:] = True  # image 1 is 128 x 96
    with torch.no_grad():
        out = model(images, pad)
        alone = model(images[1:, :, :, :96])
    assert out["masks"].shape == (2, 7, 32, 40)
    assert alone["masks"].shape == (1, 7, 32, 24)
    assert torch.isfinite(out["masks"]).all() and out["masks"].std() > 0
    model.train()
    model.freeze_mask_head()
    assert "masks" not in model(images, pad)  # a frozen head is skipped in training


def test_scaled_attention_maps_count_the_unpadded_positions():
    """``mask_attention="scaled"``: DETR's softmax maps times heads x unpadded pixels (1 = a uniform
    map), the same for an image whether it is padded in a batch or not; "softmax" is DETR's own."""
    from ddetr_cli.models.masks import MHAttentionMap

    torch.manual_seed(0)
    softmax, scaled = MHAttentionMap(64, 8), MHAttentionMap(64, 8, scaled=True)
    scaled.load_state_dict(softmax.state_dict())
    q, memory = torch.randn(2, 5, 64), torch.randn(2, 64, 6, 7)
    pad = torch.zeros(2, 6, 7, dtype=torch.bool)
    pad[1, 4:], pad[1, :, 5:] = True, True  # image 1 is 4x5 inside the 6x7 batch
    with torch.no_grad():
        p, s = softmax(q, memory, pad), scaled(q, memory, pad)
        alone = scaled(q[1:], memory[1:, :, :4, :5].contiguous(), torch.zeros(1, 4, 5, dtype=torch.bool))
    torch.testing.assert_close(p.sum((2, 3, 4)), torch.ones(2, 5))
    torch.testing.assert_close(s[0], p[0] * 8 * 42)
    torch.testing.assert_close(s[1], p[1] * 8 * 20)
    torch.testing.assert_close(s[1, :, :, :4, :5], alone[0])
    assert s[1, :, :, 4:].abs().max() == 0 and s[1, :, :, :, 5:].abs().max() == 0


def test_demo_weights_load_with_only_the_head_new():
    model, sd = _demo_with_head()
    groups = alias_groups(model)
    owner = {a: c for c, names in groups.items() for a in names}
    new = set(groups) - {owner[k] for k in sd}
    assert new and all(k.startswith(MASK_HEAD_PREFIXES) for k in new)
    assert new == {k for k in groups if k.startswith(MASK_HEAD_PREFIXES)}
    # the detector's tensors are the file's
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    # without the flag the head is "missing"; with it, a missing detector tensor is still an error
    fresh = build_model(model.cfg)
    with pytest.raises(WeightsError, match=r"missing \(bbox_attention"):
        load_state_dict_strict(fresh, sd, source="demo")
    partial = {k: v for k, v in sd.items() if not k.startswith("input_proj.0.")}
    with pytest.raises(WeightsError, match="missing.*input_proj.0"):
        load_state_dict_strict(fresh, partial, source="demo", new_mask_head=True)
    # a file that already has the head is loaded as it is, not as "new"
    with pytest.raises(WeightsError, match="already holds a mask head"):
        load_state_dict_strict(fresh, model.state_dict(), source="x", new_mask_head=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 128))
    assert out["masks"].shape == (1, model.cfg.num_queries, 24, 32)


def test_mask_head_addon_reads_back_as_the_whole_model(tmp_path):
    """The add-on holds the head only, names its base, and reads back (with the base beside it)
    as the whole model; a changed detector or a missing base is refused."""
    import shutil

    from ddetr_cli.weights.common import safetensors_metadata
    from ddetr_cli.weights.load import load_model

    model, sd = _demo_with_head()
    base = tmp_path / "demo.safetensors"
    shutil.copy(DEMO, base)
    with torch.no_grad():
        model.mask_head.out_lay.bias.fill_(0.25)  # not the initialisation: the values must travel
    # the config a --freeze-boxes fine-tune writes: the data's category ids, and not the starting
    # model's measured tracking thresholds (weights/train_demo_masks.sh failed on those)
    assert model.cfg.track_high is not None
    model.cfg = dataclasses.replace(model.cfg, track_high=None, track_low=None, category_ids=[1, 2, 3, 4, 5])
    addon = save_mask_head(model, tmp_path / "demo-masks.safetensors", base)
    assert addon.stat().st_size < 0.2 * base.stat().st_size
    assert safetensors_metadata(addon)["ddetr_base"] == "demo.safetensors"
    cfg, got, layout = read_weights(addon)
    assert cfg.masks and layout == "ddetr" and dataclasses.replace(cfg, masks=False) == read_weights(base)[0]
    own = model.state_dict()
    assert set(got) >= set(sd) and all(torch.equal(own[k], v) for k, v in got.items())
    loaded = load_model(addon)
    assert torch.equal(loaded.mask_head.out_lay.bias, torch.full((1,), 0.25))
    with torch.no_grad():
        model.input_proj[0][0].bias.add_(1.0)
    with pytest.raises(WeightsError, match="detector differs"):
        save_mask_head(model, tmp_path / "other.safetensors", base)
    moved = tmp_path / "sub"
    moved.mkdir()
    shutil.copy(addon, moved / addon.name)
    with pytest.raises(WeightsError, match="not beside it"):
        read_weights(moved / addon.name)


def test_bundled_demo_masks_addon_is_trained(tmp_path):
    """``weights/demo-masks`` reads as the demo detector (bit-identical) plus a mask head, and on
    held-out synthetic images (the demo card's test split) its mask terms (focal + dice on the
    matched queries) are below those of a freshly initialised head on the same detector."""
    from ddetr_cli.data.datasets import load_dataset
    from ddetr_cli.data.synth import generate
    from ddetr_cli.engine.train.data import TrainSet, collate
    from ddetr_cli.models.losses import build_criterion

    cfg, sd, _ = read_weights(ROOT / "weights" / "demo-masks.safetensors")
    base_cfg, base_sd, _ = read_weights(DEMO)
    assert cfg == dataclasses.replace(base_cfg, masks=True, mask_attention="scaled")
    # the detector's model card (tracking thresholds measured on its scores) comes with it
    assert base_cfg.track_high is not None and (cfg.track_high, cfg.track_low) == (base_cfg.track_high, base_cfg.track_low)
    assert all(torch.equal(sd[k], v) for k, v in base_sd.items())
    trained = build_model(cfg)
    load_state_dict_strict(trained, sd)
    fresh, _ = _demo_with_head()
    generate(tmp_path, n_train=0, n_val=0, n_test=8, seed=2026, formats=("coco",))
    ds = load_dataset(tmp_path / "coco", "test", val_fraction=0.0)
    images, pad, targets = collate([TrainSet(ds.records, 256, 0, train=False, masks=True)[(i, 0)] for i in range(8)])
    crit = build_criterion(cfg)
    losses = {}
    for name, model in (("trained", trained), ("fresh", fresh)):
        with torch.no_grad():
            out = crit(model.eval()(images, pad), targets)
        losses[name] = out["mask"].item() + out["dice"].item()
        assert out["giou"].item() < 0.5  # the detector finds the shapes: the matched masks are theirs
    assert losses["trained"] < 0.95 * losses["fresh"], losses
    # each matched query's mask is its own object's: it overlaps that object's mask more than any
    # other object's (a head blind to the query draws one blob for all of them)
    with torch.no_grad():
        out = trained(images, pad)
    own, best = [], []
    for b, (qi, ti) in enumerate(crit.matcher(out["logits"], out["boxes"], targets)):
        pred = out["masks"][b, qi].sigmoid() > 0.5  # (K, h, w)
        objects = torch.nn.functional.interpolate(targets[b]["masks"][None].float(), size=pred.shape[-2:], mode="area")[0] > 0.5
        iou = (pred[:, None] & objects[None]).sum((2, 3)) / (pred[:, None] | objects[None]).sum((2, 3)).clamp_min(1)
        own.append(iou[torch.arange(len(ti)), ti])
        best.append(iou.argmax(1) == ti)
    own_iou, best = torch.cat(own), torch.cat(best)
    assert len(own_iou) >= 20 and best.float().mean() >= 0.8 and own_iou.mean() >= 0.4, (own_iou, best)

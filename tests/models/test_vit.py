"""ViT backbone: features equal timm's VisionTransformer on the same weights (any input size),
strict timm-layout loading, the simple feature pyramid and its masks, and ViT-backbone
fine-tuning end to end (API and CLI) on the tiny examples dataset.

Everything runs on CPU with random (perturbed) weights and ViTs of 1-2 blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ddetr_cli.engine.trainer import finetune, finetune_command, param_groups
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.deformable_detr import DeformableDETR
from ddetr_cli.models.vit import PATCH, SimpleFeaturePyramid, VisionTransformer
from ddetr_cli.weights.load import WeightsError, load_model, save_model
from ddetr_cli.weights.vit import load_timm_vit

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[2]
COCO = ROOT / "examples" / "data" / "coco"
TINY_ARCH = ["vit_depth=1", "d_model=64", "nheads=4", "enc_layers=1", "dec_layers=1", "num_queries=20",
             "dim_feedforward=128"]


def tiny_config(**kw) -> ModelConfig:
    """The test suite's tiny detector (d_model 64, 1+1 layers, 20 queries, 5 classes)."""
    base = dict(num_classes=5, backbone_depth=18, d_model=64, nheads=4, enc_layers=1, dec_layers=1,
                dim_feedforward=128, num_queries=20)
    return ModelConfig(**{**base, **kw})


def _timm_vit(name: str, depth: int, seed: int = 0) -> torch.nn.Module:
    """A timm ViT with every parameter perturbed (biases, norms and the class token included, so
    none of them can be ignored by mistake), in eval mode."""
    torch.manual_seed(seed)
    ref = timm.create_model(name, pretrained=False, depth=depth, dynamic_img_size=True, dynamic_img_pad=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref.eval()


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def _timm_patch_map(ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's final-normed tokens -> the patch tokens as (B, C, ceil(H/16), ceil(W/16))."""
    tokens = ref.forward_features(x)[:, ref.num_prefix_tokens :]
    h, w = -(-x.shape[-2] // PATCH), -(-x.shape[-1] // PATCH)
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)


# ------------------------------------------------------------------------------- parity with timm


@pytest.mark.parametrize(("backbone", "timm_name", "suffix"), [
    ("vit-small", "vit_small_patch16_224", ".safetensors"),
    ("vit-base", "vit_base_patch16_224", ".pth"),
])
def test_features_equal_timm(backbone: str, timm_name: str, suffix: str, tmp_path: Path) -> None:
    ref = _timm_vit(timm_name, depth=2)
    path = _save(ref.state_dict(), tmp_path / f"vit{suffix}")
    ours = VisionTransformer.from_name(backbone, depth=2).eval()
    note = load_timm_vit(ours, path)
    assert "head.weight" in note  # the classifier is dropped, and said so
    torch.manual_seed(1)
    # 224 (the pretraining grid, no resampling), non-square non-224 (resampled position
    # embedding), and a size that is not a multiple of 16 (padded like timm's dynamic_img_pad)
    for hw in [(224, 224), (160, 288), (100, 130)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            got, want = ours(x), _timm_patch_map(ref, x)
        assert got.shape == want.shape == (2, ours.embed_dim, -(-hw[0] // 16), -(-hw[1] // 16))
        assert (got - want).abs().max().item() <= 1e-4, hw


def test_parity_tolerance_sees_resampling_details(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-224 comparison above can fail: the same bicubic resampling without antialias
    already puts the features outside the tolerance."""
    from torch.nn import functional as F

    from ddetr_cli.models import vit

    ref = _timm_vit("vit_small_patch16_224", depth=1)
    ours = VisionTransformer.from_name("vit-small", depth=1).eval()
    load_timm_vit(ours, _save(ref.state_dict(), tmp_path / "v.safetensors"))
    x = torch.randn(1, 3, 128, 96)  # an 8x6 grid: a downsampled embedding, where antialias acts
    with torch.no_grad():
        want = _timm_patch_map(ref, x)
        assert (ours(x) - want).abs().max().item() <= 1e-4
        # F is torch's module, shared with timm: patched only after timm's features are taken
        real_interpolate = F.interpolate
        monkeypatch.setattr(vit.F, "interpolate", lambda *a, **k: real_interpolate(*a, **{**k, "antialias": False}))
        assert (ours(x) - want).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------- strict loading


def test_strict_loading_names_keys(tmp_path: Path) -> None:
    sd = _timm_vit("vit_small_patch16_224", depth=2).state_dict()
    ours = VisionTransformer.from_name("vit-small", depth=3)
    with pytest.raises(WeightsError, match=r"missing \(blocks\.2\.") as e:
        load_timm_vit(ours, _save(sd, tmp_path / "a.safetensors"))
    assert "\n" not in str(e.value)

    ours = VisionTransformer.from_name("vit-small", depth=2)
    extra = {**sd, "reg_token": torch.zeros(1, 4, 384)}
    with pytest.raises(WeightsError, match=r"unexpected \(reg_token\)"):
        load_timm_vit(ours, _save(extra, tmp_path / "b.pth"))

    base = _timm_vit("vit_base_patch16_224", depth=2).state_dict()
    with pytest.raises(WeightsError, match=r"has shape .* the model expects"):
        load_timm_vit(ours, _save(base, tmp_path / "c.safetensors"))

    with pytest.raises(WeightsError, match="not found"):
        load_timm_vit(ours, tmp_path / "nope.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="corrupt"):
        load_timm_vit(ours, tmp_path / "junk.pth")

    # wrappers of training scripts are accepted: {"model": sd} with DDP prefixes
    wrapped = {"model": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "d.pth")
    load_timm_vit(ours, tmp_path / "d.pth")
    assert torch.equal(ours.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


# ------------------------------------------------------------------------------- pyramid and masks


def test_pyramid_shapes_strides() -> None:
    pyr = SimpleFeaturePyramid(384)
    x = torch.randn(2, 384, 7, 9)
    outs = pyr(x)
    assert pyr.strides == [8, 16, 32] and pyr.channels == [192, 384, 384]
    assert [tuple(o.shape) for o in outs] == [(2, 192, 14, 18), (2, 384, 7, 9), (2, 384, 4, 5)]
    assert torch.equal(outs[1], x)
    # the stride-32 map keeps the odd last row/column (ceil), as a max over what is there
    assert torch.equal(outs[2][..., -1, -1], x[..., -1, -1])
    single = SimpleFeaturePyramid(384, (32,))
    assert single.channels == [384] and not list(single.parameters())
    assert torch.equal(single(x)[0], outs[2])


@pytest.mark.parametrize("levels", [4, 1])
def test_every_parameter_gets_a_gradient(levels: int) -> None:
    """No parameter the ViT model holds goes unused (DDP refuses those), multi- and single-scale."""
    torch.manual_seed(0)
    model = DeformableDETR(tiny_config(backbone="vit-small", vit_depth=1, num_feature_levels=levels)).train()
    out = model(torch.randn(1, 3, 64, 80))
    (out["logits"].sum() + out["boxes"].sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_detector_levels_and_masks() -> None:
    torch.manual_seed(0)
    model = DeformableDETR(tiny_config(backbone="vit-small", vit_depth=1)).eval()
    h, w, valid_w = 100, 130, 70  # padded to 112 x 144 for the ViT
    images = torch.randn(2, 3, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[0, :, valid_w:] = True
    with torch.no_grad():
        srcs, masks = model._levels(images, mask)
    hp, wp = 112, 144
    assert [tuple(s.shape[-2:]) for s in srcs] == [(14, 18), (7, 9), (4, 5), (2, 3)]  # strides 8/16/32/64
    assert all(s.shape[:2] == (2, 64) for s in srcs)
    padded = torch.ones(2, hp, wp, dtype=torch.bool)
    padded[:, :h, :w] = mask
    for m in masks:
        lh, lw = m.shape[-2:]
        # nearest downsampling of the image mask padded to whole patches
        rows = torch.arange(lh) * hp // lh
        cols = torch.arange(lw) * wp // lw
        assert torch.equal(m, padded[:, rows][:, :, cols])
    # stride 8 and 16 sample each cell's top-left pixel: padding exactly from column 70 on
    assert torch.equal(masks[1][0, 0], torch.arange(9) * 16 >= valid_w)
    assert torch.equal(masks[0][0, 0], torch.arange(18) * 8 >= valid_w)
    assert not masks[1][1].any()
    # rows 100..111 exist only through the patch padding: the stride-8 row sampling pixel 104 is
    # padding in both images (the unpadded mask would have sampled the valid row 92); so is column 136
    assert masks[0][:, 13].all() and masks[0][:, :, 17].all() and not masks[0][1, :13, :17].any()
    with torch.no_grad():
        out = model(images, mask)
    assert out["logits"].shape == (2, 20, 5) and torch.isfinite(out["boxes"]).all()


def test_vit_model_layout_lr_groups_and_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DeformableDETR(tiny_config(backbone="vit-small", vit_depth=1))
    names = set(model.state_dict())
    assert {"backbone.body.cls_token", "backbone.body.pos_embed", "backbone.body.patch_embed.proj.weight",
            "backbone.body.blocks.0.attn.qkv.weight", "backbone.body.norm.weight", "pyramid.up.weight"} <= names
    assert not any(k.startswith("pyramid") for k in DeformableDETR(tiny_config()).state_dict())
    assert all(p.requires_grad for p in model.parameters())  # the whole ViT trains (no frozen stem)
    groups = {g["name"]: g for g in param_groups(model, 1e-4, 1e-5, 1e-4)}
    vit_params = {id(p) for p in model.backbone.body.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == vit_params and groups["backbone"]["lr"] == 1e-5
    assert id(model.pyramid.up.weight) in {id(p) for p in groups["rest"]["params"]}

    path = save_model(model, tmp_path / "vit.safetensors")
    loaded = load_model(path)
    assert loaded.cfg.backbone == "vit-small" and loaded.cfg.vit_depth == 1
    x = torch.randn(1, 3, 96, 120)
    model.eval()
    with torch.no_grad():
        a = model(x)
        b = loaded(x)
        loaded.optimize_for_inference()  # what Detector does: a no-op fold for a ViT, same outputs
        c = loaded(x)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["boxes"], b["boxes"])
    assert torch.allclose(a["logits"], c["logits"], atol=1e-4)
    assert not loaded.inference_only

    from typer.testing import CliRunner

    from ddetr_cli.cli.main import app

    r = CliRunner().invoke(app, ["weights", "info", str(path)])
    assert r.exit_code == 0 and "vit-small (1 blocks)" in r.output, r.output


# ------------------------------------------------------------------------------- fine-tuning


def test_finetune_vit_backbone_checkpoints_and_predicts(tmp_path: Path) -> None:
    from ddetr_cli.engine.predictor import Detector

    ref = _timm_vit("vit_small_patch16_224", depth=1)
    weights = _save(ref.state_dict(), tmp_path / "vit_small.safetensors")
    # backbone lr ~0: after two steps the ViT still holds the timm weights it started from
    res = finetune(COCO, backbone="vit-small", backbone_weights=str(weights), arch=TINY_ARCH, imgsz=64, batch=2,
                   epochs=1, max_steps=2, workers=0, lr_backbone=1e-12, out=str(tmp_path / "runs"),
                   register=False, verbose=False)
    assert res.best is not None and res.best.is_file() and (res.run_dir / "last.pt").is_file()
    args = json.loads((res.run_dir / "args.json").read_text())
    assert args["backbone"] == "vit-small" and args["backbone_weights"] == str(weights)
    model = load_model(res.best)
    assert model.cfg.backbone == "vit-small" and model.cfg.vit_depth == 1 and model.cfg.imgsz == 64
    for k, v in ref.state_dict().items():
        if not k.startswith("head."):
            assert torch.allclose(model.backbone.body.state_dict()[k], v, atol=1e-6), k
    det = Detector(model, device="cpu", imgsz=64)
    dets = det(str(next((COCO / "valid").glob("*.jpg"))), conf=0.0, max_det=5)
    assert len(dets) == 1 and len(dets[0]) == 5

    # --model a ViT checkpoint + --backbone vit-small: continues from it (not a new model)
    again = finetune(COCO, model=str(res.best), backbone="vit-small", imgsz=64, batch=2, epochs=1, max_steps=1,
                     workers=0, out=str(tmp_path / "runs"), register=False, verbose=False)
    assert again.best is not None


@pytest.mark.parametrize("case", ["bad_weights", "missing_weights", "weights_without_vit", "resnet_model",
                                  "unknown_backbone", "conflicting_arch"])
def test_bad_backbone_options_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       tiny_model_path: Path) -> None:
    kw: dict = {"backbone": "vit-small", "arch": TINY_ARCH, "imgsz": 64, "max_steps": 1, "workers": 0,
                "out": str(tmp_path), "register": False, "quiet": True}
    if case == "bad_weights":
        torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
        kw["backbone_weights"] = str(tmp_path / "bad.pth")
    elif case == "missing_weights":
        kw["backbone_weights"] = str(tmp_path / "nope.safetensors")
    elif case == "weights_without_vit":
        kw = {"scratch": True, "arch": ["backbone_depth=18"], "backbone_weights": "x.pth", "out": str(tmp_path),
              "quiet": True}
    elif case == "resnet_model":
        kw = {**kw, "model": str(tiny_model_path), "arch": None}
    elif case == "unknown_backbone":
        kw["backbone"] = "vit-huge"
    elif case == "conflicting_arch":
        kw["arch"] = TINY_ARCH + ["backbone=vit-base"]
    assert finetune_command(str(COCO), **kw) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not list(tmp_path.glob("exp*")), "no run folder for a run that cannot start"


def test_cli_backbone_option(tmp_path: Path) -> None:
    """`ddetr finetune --backbone vit-small` parses and runs; a bad --backbone-weights is one line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # DDETR_HOME: the test's own
    base = [sys.executable, "-m", "ddetr_cli", "finetune", str(COCO), "--backbone", "vit-small", "--imgsz", "64",
            "--batch", "2", "--workers", "0", "--max-steps", "1", "--epochs", "1", "--out", str(tmp_path), "--quiet"]
    for a in TINY_ARCH:
        base += ["--arch", a]
    # a timm file of the wrong depth: the missing block is named on one line
    _save(_timm_vit("vit_small_patch16_224", depth=1).state_dict(), tmp_path / "d1.safetensors")
    r = subprocess.run(base + ["--arch", "vit_depth=2", "--backbone-weights", str(tmp_path / "d1.safetensors")],
                       env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "missing" in lines[0] and "blocks.1." in lines[0]

    r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    best = tmp_path / "exp" / "best.safetensors"
    assert load_model(best).cfg.backbone == "vit-small"

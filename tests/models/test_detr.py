"""DETR: parity with transformers' DetrForObjectDetection / DetrForSegmentation through the hub
and official loaders, post-processing parity, its loss against transformers' DETR loss, and the
CLI paths (detect, finetune, weights list) on tiny random models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import image_batch, make_hf_detr, save_hub
from typer.testing import CliRunner

from ddetr_cli.cli.main import app
from ddetr_cli.engine.predictor import postprocess
from ddetr_cli.models.build import build_model
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.losses import DETRCriterion
from ddetr_cli.weights.load import WeightsError, detect_layout, load_model, read_weights, save_model

pytest.importorskip("transformers")
TOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

CASES = {
    "r18-timm": dict(backbone="resnet18"),
    "r18-transformers-resnet": dict(backbone="resnet18", timm=False),
    "r50-dc5": dict(backbone="resnet50", dilation=True),
}


def _run_both(hf, ours):
    pixels, valid = image_batch()
    with torch.no_grad():
        ref = hf(pixel_values=pixels, pixel_mask=valid.long())
        out = ours(pixels, ~valid)
    return ref, out, valid


def _assert_close(ref, out, masks: bool = False) -> None:
    # the outputs must vary, so that a constant model could not pass
    assert ref.logits.std() > 1e-2 and ref.pred_boxes.std() > 1e-3
    assert out["logits"].shape[-1] == ref.logits.shape[-1]  # C + 1 ("no object")
    dl = (ref.logits - out["logits"]).abs().max().item()
    db = (ref.pred_boxes - out["boxes"]).abs().max().item()
    assert dl <= TOL and db <= TOL, f"logits diff {dl:.2e}, boxes diff {db:.2e}"
    if masks:
        assert ref.pred_masks.std() > 1e-2 and out["masks"].shape == ref.pred_masks.shape
        dm = (ref.pred_masks - out["masks"]).abs().max().item()
        assert dm <= TOL, f"masks diff {dm:.2e}"
    else:
        assert "masks" not in out


@pytest.mark.parametrize("case", list(CASES))
def test_hub_detection_parity(case, tmp_path):
    hf = make_hf_detr(**CASES[case])
    save_hub(hf, tmp_path / "hub")
    assert detect_layout(tmp_path / "hub") == "hub"
    ours = load_model(tmp_path / "hub")
    assert ours.cfg.arch == "detr" and not ours.cfg.masks
    assert ours.cfg.variant == ("detr-dc5" if CASES[case].get("dilation") else "detr")
    assert ours.cfg.class_names[3] == "class3"
    ref, out, _ = _run_both(hf, ours)
    _assert_close(ref, out)


@pytest.mark.parametrize("case", ["r18-timm", "r50-dc5"])
def test_hub_segmentation_parity(case, tmp_path):
    hf = make_hf_detr(segmentation=True, seed=2, **CASES[case])
    save_hub(hf, tmp_path / "hub")
    ours = load_model(tmp_path / "hub")
    assert ours.cfg.masks
    _assert_close(*_run_both(hf, ours)[:2], masks=True)


def test_hub_bin_and_optimized_inference(tmp_path):
    """pytorch_model.bin weights; folding the BNs keeps the outputs (Detector does this)."""
    hf = make_hf_detr(segmentation=True, seed=4)
    save_hub(hf, tmp_path / "hub", safetensors=False)
    ours = load_model(tmp_path / "hub").optimize_for_inference()
    assert ours.inference_only
    _assert_close(*_run_both(hf, ours)[:2], masks=True)


# --- official torch-hub layout, built by renaming the transformers state dict ------------------

def hub_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers DETR names -> facebookresearch/detr names (panoptic ones keep ``detr.``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        prefix = "detr." if k.startswith("detr.") else ""
        k = k.removeprefix("detr.")
        k = k.replace("model.backbone.conv_encoder.model.", "backbone.0.body.")
        k = k.replace("model.input_projection.", "input_proj.").replace("model.query_position_embeddings.", "query_embed.")
        k = k.replace("model.decoder.layernorm.", "transformer.decoder.norm.")
        k = re.sub(r"^model\.(en|de)coder\.layers\.", r"transformer.\1coder.layers.", k)
        if k.startswith("transformer.encoder."):
            k = k.replace("self_attn_layer_norm", "norm1").replace("final_layer_norm", "norm2")
        if k.startswith("transformer.decoder."):
            k = (k.replace("self_attn_layer_norm", "norm1").replace("encoder_attn_layer_norm", "norm2")
                 .replace("final_layer_norm", "norm3").replace("encoder_attn.", "multihead_attn."))
        k = k.replace(".fc1.", ".linear1.").replace(".fc2.", ".linear2.")
        k = k.replace("class_labels_classifier.", "class_embed.").replace("bbox_predictor.", "bbox_embed.")
        if not k.startswith(("bbox_attention.", "mask_head.")):
            k = prefix + k
        out[k] = v
    for k in [k for k in out if ".q_proj." in k]:
        base, kind = k.split(".q_proj.")
        out[f"{base}.in_proj_{kind}"] = torch.cat(
            [out.pop(f"{base}.q_proj.{kind}"), out.pop(f"{base}.k_proj.{kind}"), out.pop(f"{base}.v_proj.{kind}")])
    return out


@pytest.mark.parametrize("segmentation,case,name", [
    (False, "r18-timm", "detr-r18-test.pth"),
    (False, "r50-dc5", "detr-r50-dc5-test.pth"),  # no args: DC5 comes from the file name
    (True, "r18-timm", "detr-r18-panoptic-test.pth"),
])
def test_official_layout_parity(segmentation, case, name, tmp_path):
    hf = make_hf_detr(segmentation=segmentation, seed=3, **CASES[case])
    sd = hub_to_official(hf.state_dict())
    assert any(".multihead_attn.in_proj_weight" in k for k in sd)
    assert any(k.startswith(("backbone.0.body.", "detr.backbone.0.body.")) for k in sd)
    path = tmp_path / name
    torch.save({"model": sd}, path)  # the published files hold no args
    assert detect_layout(path) == "official"
    ours = load_model(path)
    assert ours.cfg.arch == "detr" and ours.cfg.masks == segmentation and ours.cfg.num_queries == 12
    _assert_close(*_run_both(hf, ours)[:2], masks=segmentation)


def test_missing_key_named(tmp_path):
    hf = make_hf_detr()
    sd = hub_to_official(hf.state_dict())
    sd.pop("transformer.decoder.norm.weight")
    torch.save({"model": sd}, tmp_path / "detr.pth")
    with pytest.raises(WeightsError, match=r"transformer\.decoder\.norm\.weight"):
        load_model(tmp_path / "detr.pth")


def test_own_format_round_trip(tmp_path):
    hf = make_hf_detr(segmentation=True)
    save_hub(hf, tmp_path / "hub")
    a = load_model(tmp_path / "hub")
    p = save_model(a, tmp_path / "m.safetensors")
    cfg, _, layout = read_weights(p)
    assert layout == "ddetr" and cfg == a.cfg
    b = load_model(p)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    assert torch.equal(oa["logits"], ob["logits"]) and torch.equal(oa["masks"], ob["masks"])


# --- post-processing ---------------------------------------------------------------------------

def test_postprocess_parity(tmp_path):
    """Boxes, scores and labels as transformers' post_process_object_detection; masks as its
    post_process_instance (DETR's PostProcessSegm), on a padded batch resized from other sizes."""
    from transformers import DetrImageProcessor

    hf = make_hf_detr(segmentation=True, seed=5)
    save_hub(hf, tmp_path / "hub")
    ours = load_model(tmp_path / "hub")
    ref, out, valid = _run_both(hf, ours)
    orig = [(240, 320), (50, 45)]  # original sizes; the batch holds them resized to 120x160, 100x90
    proc = DetrImageProcessor()
    conf = 0.15
    results = proc.post_process_object_detection(ref, threshold=conf, target_sizes=orig)
    results = proc.post_process_instance(results, ref, torch.tensor(orig),
                                         torch.tensor([[120, 160], [100, 90]]), threshold=0.5)
    dets = postprocess(out["logits"], out["boxes"], orig, conf=conf, max_det=100, no_object=True,
                       masks=out["masks"], pad_mask=~valid)
    probs = ref.logits.softmax(-1)[..., :-1].max(-1)[0]
    n_total = 0
    for i, (d, r) in enumerate(zip(dets, results)):
        order = torch.argsort(-r["scores"])  # ours are best first
        n_total += len(d)
        assert len(d) == len(r["scores"])
        np.testing.assert_allclose(d.confidence, r["scores"][order].numpy(), atol=1e-5)
        assert d.class_id.tolist() == r["labels"][order].tolist()
        ref_boxes = r["boxes"][order].clone()
        ref_boxes[:, 0::2] = ref_boxes[:, 0::2].clamp(0, orig[i][1])  # ours are clipped to the image
        ref_boxes[:, 1::2] = ref_boxes[:, 1::2].clamp(0, orig[i][0])
        np.testing.assert_allclose(d.xyxy, ref_boxes.numpy(), atol=1e-3)
        # masks of the kept queries (post_process_instance returns one per query)
        kept = torch.nonzero(probs[i] > conf).flatten()[order]
        ref_masks = r["masks"][kept, 0].bool().numpy()
        assert d.mask is not None and d.mask.dtype == bool and d.mask.shape == (len(d), *orig[i])
        assert np.array_equal(d.mask, ref_masks)
    assert n_total >= 3 and any(d.mask.any() and not d.mask.all() for d in dets)


def test_postprocess_classes_and_max_det():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 30, 5, generator=g) * 2
    boxes = torch.rand(1, 30, 4, generator=g) * 0.5 + 0.25
    [all_] = postprocess(logits, boxes, [(100, 100)], conf=0.0, max_det=30, no_object=True)
    prob = logits.softmax(-1)[0, :, :-1]
    assert sorted(all_.confidence.tolist()) == pytest.approx(sorted(prob.max(-1)[0].tolist()), abs=1e-6)
    [top] = postprocess(logits, boxes, [(100, 100)], conf=0.0, max_det=4, no_object=True)
    assert top.confidence.tolist() == pytest.approx(sorted(prob.max(-1)[0].tolist())[::-1][:4], abs=1e-6)
    [only] = postprocess(logits, boxes, [(100, 100)], conf=0.0, max_det=30, classes=[2], no_object=True)
    want = (prob.argmax(-1) == 2).sum().item()
    assert set(only.class_id[only.confidence > 0].tolist()) == {2} and (only.confidence > 0).sum() == want


# --- loss ---------------------------------------------------------------------------------------

def test_loss_matches_transformers():
    from transformers.loss.loss_for_object_detection import HungarianMatcher as HFMatcher
    from transformers.loss.loss_for_object_detection import ImageLoss

    g = torch.Generator().manual_seed(0)
    b, q, c, layers = 2, 9, 4, 3
    outs = [(torch.randn(b, q, c + 1, generator=g) * 2, torch.rand(b, q, 4, generator=g) * 0.4 + 0.2) for _ in range(layers)]
    targets = [{"labels": torch.tensor([0, 3, 1]), "boxes": torch.rand(3, 4, generator=g) * 0.4 + 0.2},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2]])}]
    ours = DETRCriterion(c)({"logits": outs[-1][0], "boxes": outs[-1][1],
                             "aux": [{"logits": lg, "boxes": bx} for lg, bx in outs[:-1]]}, targets)
    ref_crit = ImageLoss(HFMatcher(class_cost=1, bbox_cost=5, giou_cost=2), num_classes=c, eos_coef=0.1,
                         losses=["labels", "boxes"])
    ref = ref_crit({"logits": outs[-1][0], "pred_boxes": outs[-1][1],
                    "auxiliary_outputs": [{"logits": lg, "pred_boxes": bx} for lg, bx in outs[:-1]]},
                   [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets])
    for suffix in ["", "_0", "_1"]:
        assert ours[f"cls{suffix}"].item() == pytest.approx(ref[f"loss_ce{suffix}"].item(), rel=1e-5)
        assert ours[f"bbox{suffix}"].item() == pytest.approx(ref[f"loss_bbox{suffix}"].item(), rel=1e-5)
        assert ours[f"giou{suffix}"].item() == pytest.approx(ref[f"loss_giou{suffix}"].item(), rel=1e-5)
    want = sum(1 * ref[f"loss_ce{s}"] + 5 * ref[f"loss_bbox{s}"] + 2 * ref[f"loss_giou{s}"] for s in ["", "_0", "_1"])
    assert ours["loss"].item() == pytest.approx(want.item(), rel=1e-5)


# --- CLI ----------------------------------------------------------------------------------------

TINY = dict(backbone_depth=18, d_model=64, nheads=8, enc_layers=1, dec_layers=1, dim_feedforward=128, num_queries=12)
NAMES = ["circle", "square", "triangle", "cross", "ring"]


def _tiny_detr(path: Path, masks: bool = False, names=NAMES) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_variant("detr", masks=masks, num_classes=len(names), class_names=list(names), **TINY))
    with torch.no_grad():  # random heads give near-uniform softmax scores: spread them
        model.class_embed.weight.mul_(20)
    return save_model(model, path)


def test_cli_detect_with_masks(tmp_path):
    """`ddetr detect --masks` with a real mask-head DETR: the polygons in predictions.json decode
    (pycocotools annToMask) to the masks the Detector API predicts, IoU >= 0.95 each."""
    import cv2
    from pycocotools.coco import COCO

    model = _tiny_detr(tmp_path / "tiny_detr.safetensors", masks=True)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(120, 160), (90, 70)]):
        cv2.imwrite(str(folder / f"im{i}.png"), (rng.random((h, w, 3)) * 255).astype(np.uint8))
    out = tmp_path / "run"
    r = runner.invoke(app, ["detect", str(folder), "--model", str(model), "--out", str(out), "--imgsz", "96",
                            "--conf", "0.05", "--json", "--masks"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    pred = json.loads((out / "predictions.json").read_text())
    assert len(pred["images"]) == 2 and pred["annotations"]

    from ddetr_cli.engine.predictor import Detector

    det = Detector.from_pretrained(str(model), device="cpu", imgsz=96)
    dets = det([str(p) for p in sorted(folder.iterdir())], conf=0.05, batch_size=1)  # as the CLI batches
    assert dets[0].mask.shape == (len(dets[0]), 120, 160) and dets[1].mask.shape == (len(dets[1]), 90, 70)
    coco = COCO(str(out / "predictions.json"))
    checked = 0
    for im, d in zip(sorted(coco.dataset["images"], key=lambda im: im["file_name"]), dets):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        assert len(anns) == len(d)
        for a, m, box in zip(anns, d.mask, d.xyxy):
            np.testing.assert_allclose(a["bbox"][:2], box[:2], atol=0.01)
            if not m.any():
                assert a["segmentation"] == []
                continue
            back = coco.annToMask(a).astype(bool)
            iou = (back & m).sum() / (back | m).sum()
            assert iou >= 0.95, (im["file_name"], iou)
            checked += 1
    assert checked > 0


@pytest.mark.slow
def test_finetune_scratch_and_from_detr_checkpoint(tmp_path):
    from ddetr_cli.engine.trainer import finetune

    data = ROOT / "examples" / "data" / "coco"
    common = dict(imgsz=96, batch=2, workers=0, max_steps=2, epochs=1, register=False, verbose=False, ema=False)
    res = finetune(data, scratch=True, variant="detr", arch=[f"{k}={v}" for k, v in TINY.items()],
                   out=str(tmp_path / "runs"), **common)
    assert res.best is not None and (res.run_dir / "last.pt").is_file()
    m = load_model(res.best)
    assert m.cfg.arch == "detr" and m.cfg.class_names == NAMES and m.class_embed.out_features == len(NAMES) + 1

    # from a DETR-segm checkpoint with other classes: class head re-initialised, mask head kept as
    # is with --no-train-masks (tests/engine/test_mask_training.py trains it)
    start = _tiny_detr(tmp_path / "start.safetensors", masks=True, names=["a", "b", "c"])
    res2 = finetune(data, model=str(start), out=str(tmp_path / "runs2"), train_masks=False, **common)
    m2 = load_model(res2.best)
    assert m2.cfg.masks and m2.class_embed.out_features == len(NAMES) + 1
    m0 = load_model(start)
    assert torch.equal(m0.mask_head.lay1.weight, m2.mask_head.lay1.weight)
    assert not torch.equal(m0.transformer.decoder.norm.weight, m2.transformer.decoder.norm.weight)


def test_weights_list_shows_detr_models():
    r = runner.invoke(app, ["weights", "list", "--json"])
    assert r.exit_code == 0, r.output
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    for name in ["detr-resnet-50", "detr-resnet-101", "detr-resnet-50-dc5", "detr-resnet-101-dc5", "detr-resnet-50-panoptic"]:
        assert entries[name]["source"] == f"hub:facebook/{name}"


def test_config_validation():
    with pytest.raises(ValueError, match="one feature level"):
        ModelConfig(arch="detr", num_feature_levels=4)
    with pytest.raises(ValueError, match="mask head"):
        ModelConfig.from_variant("detr", masks=True, d_model=64, nheads=4)
    assert ModelConfig(masks=True).masks  # Deformable DETR takes the same head (models/masks.py)
    with pytest.raises(ValueError, match="need a ResNet backbone"):
        ModelConfig(masks=True, backbone="vit-small")
    assert ModelConfig.from_variant("detr-dc5").variant == "detr-dc5"


@pytest.mark.slow
def test_eval_reports_mask_ap_and_video_writes_polygons_with_a_mask_detr(tmp_path):
    """A mask-head DETR through `evaluate` (mask AP equal to pycocotools' segm run on the saved
    files) and through `run_video --masks` (one JSONL record per frame, polygons in it)."""
    from coco_reference import cocoeval_stats

    from ddetr_cli.data.datasets import load_dataset
    from ddetr_cli.engine.evaluator import METRIC_NAMES, evaluate
    from ddetr_cli.engine.predictor import Detector
    from ddetr_cli.engine.video import run_video

    det = Detector.from_pretrained(str(_tiny_detr(tmp_path / "m.safetensors", masks=True)), device="cpu", imgsz=96)
    data = ROOT / "examples" / "data" / "coco"
    res = evaluate(det, load_dataset(data, "val"), out_dir=tmp_path / "ev", save_predictions=True, workers=1)
    assert res.mask_metrics is not None
    stats = cocoeval_stats(data / "valid" / "_annotations.coco.json", tmp_path / "ev" / "predictions.json", "segm")
    for name, s in zip(METRIC_NAMES, stats):
        assert res.mask_metrics[name] == (None if s < 0 else pytest.approx(s, abs=1e-12)), name

    out = run_video(det, ROOT / "examples" / "clip.mp4", tmp_path / "vid", save_json=True, masks=True,
                    conf=0.05, handle_signals=False)
    recs = [json.loads(x) for x in Path(out.outputs["jsonl"]).read_text().splitlines()]
    n = len(json.loads((ROOT / "examples" / "clip.json").read_text())["frames"])
    assert len(recs) == out.frames == n
    segs = [d["segmentation"] for r in recs for d in r["detections"]]
    assert segs and any(segs) and all(len(p) >= 6 for s in segs for p in s)

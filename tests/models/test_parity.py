"""Parity with transformers' DeformableDetrForObjectDetection, through the weight loaders."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from hf_reference import VARIANT_FLAGS, image_batch, make_hf_model, save_hub

from ddetr_cli.models.fusion import FastLinear, FusedConv2d
from ddetr_cli.weights.load import WeightsError, detect_layout, load_model

pytest.importorskip("transformers")
TOL = 1e-4


def _run_both(hf, ours):
    pixels, valid = image_batch()
    with torch.no_grad():
        ref = hf(pixel_values=pixels, pixel_mask=valid.long())
        out = ours(pixels, ~valid)
    return ref, out


def _assert_optimized_close(ref, ours):
    """The inference path (BN folded, fused conv/linear epilogues, channels-last) agrees too."""
    ours.optimize_for_inference()
    assert any(isinstance(m, FusedConv2d) for m in ours.modules())
    assert any(isinstance(m, FastLinear) and m.relu for m in ours.modules())
    assert not any(type(m) is torch.nn.Linear for m in ours.modules())
    pixels, valid = image_batch()
    with torch.inference_mode():
        out = ours(pixels, ~valid)
    _assert_close(ref, out)


def _assert_close(ref, out):
    # A check that could not fail if the model produced constants: the outputs must vary.
    assert ref.logits.std() > 1e-2 and ref.pred_boxes.std() > 1e-3
    dl = (ref.logits - out["logits"]).abs().max().item()
    db = (ref.pred_boxes - out["boxes"]).abs().max().item()
    assert dl <= TOL and db <= TOL, f"logits diff {dl:.2e}, boxes diff {db:.2e}"


@pytest.mark.parametrize("variant", list(VARIANT_FLAGS))
def test_hub_layout_parity(variant, tmp_path):
    hf = make_hf_model(variant)
    save_hub(hf, tmp_path / "hub")
    assert detect_layout(tmp_path / "hub") == "hub"
    ours = load_model(tmp_path / "hub")
    assert ours.cfg.variant == variant
    ref, out = _run_both(hf, ours)
    _assert_close(ref, out)
    if variant == "two-stage":
        # encoder proposals feed the decoder's queries; compare them directly too
        d = (ref.enc_outputs_class - out["enc"]["logits"]).abs().max().item()
        assert d <= TOL
    _assert_optimized_close(ref, ours)


@pytest.mark.parametrize("variant", ["multi-scale", "box-refine", "two-stage"])
def test_decoder_sampling_before_projecting_keeps_parity(variant, tmp_path):
    """The decoder's cross-attention sampling the memory first and projecting after
    (UnprojectedValue, what CPU inference takes at full image sizes) gives transformers' outputs
    on a padded batch (the padding zeroes rows and the bias's weight), plain and optimised."""
    hf = make_hf_model(variant)
    save_hub(hf, tmp_path / "hub")
    ours = load_model(tmp_path / "hub")
    ours.sample_first = True
    calls = []
    attn = ours.transformer.decoder.layers[0].cross_attn
    hook = attn.register_forward_pre_hook(lambda mod, args: calls.append(type(args[2]).__name__))
    ref, out = _run_both(hf, ours)
    assert calls == ["UnprojectedValue"]
    _assert_close(ref, out)
    _assert_optimized_close(ref, ours)
    hook.remove()


def test_decoder_samples_first_at_full_size_in_cpu_inference():
    """The cost rule: an 800x1066 image's 17,821 positions against 300 queries pick sampling first
    in inference, not under autograd; the encoder's case and a small image keep the value GEMM."""
    from ddetr_cli.models.build import build_model
    from ddetr_cli.models.config import ModelConfig
    from ddetr_cli.models.deformable_detr import UnprojectedValue

    model = build_model(ModelConfig.from_variant("multi-scale", num_classes=91)).eval()
    attn = model.transformer.decoder.layers[0].cross_attn
    assert UnprojectedValue.pays(300, 17821, attn)
    assert not UnprojectedValue.pays(17821, 17821, attn)  # the encoder's case
    assert not UnprojectedValue.pays(300, 1840, attn)  # a 256x341 image: the value GEMM is small
    memory = torch.randn(1, 17821, 256)
    with torch.inference_mode():
        assert isinstance(model._decoder_value(memory, None, 300), UnprojectedValue)
    with torch.enable_grad():
        assert model._decoder_value(memory, None, 300) is memory


def test_hub_layout_full_size_resnet18_bin(tmp_path):
    """Default transformer sizes (d_model 256, 6+6 layers, 300 queries), ResNet-18 backbone,
    weights written as pytorch_model.bin instead of safetensors."""
    hf = make_hf_model("multi-scale", backbone="resnet18", small=False, num_labels=91)
    save_hub(hf, tmp_path / "hub", safetensors=False)
    assert (tmp_path / "hub" / "pytorch_model.bin").is_file()
    ours = load_model(tmp_path / "hub")
    assert ours.cfg.d_model == 256 and ours.cfg.num_queries == 300 and ours.cfg.backbone_depth == 18
    ref, out = _run_both(hf, ours)
    _assert_close(ref, out)
    _assert_optimized_close(ref, ours)


# --- official layout: built by renaming the transformers state dict (the facts file's table) --

def hub_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = k.replace("model.backbone.conv_encoder.model.", "backbone.0.body.")
        if k.startswith("model."):
            k = "transformer." + k[len("model."):]
        k = k.replace("transformer.input_proj.", "input_proj.")
        k = k.replace("transformer.query_position_embeddings.", "query_embed.")
        enc = re.match(r"transformer\.encoder\.layers\.\d+\.", k)
        if enc:
            k = k.replace("self_attn_layer_norm", "norm1").replace("final_layer_norm", "norm2")
        if re.match(r"transformer\.decoder\.layers\.\d+\.", k):
            k = (k.replace("encoder_attn_layer_norm", "norm1").replace("self_attn_layer_norm", "norm2")
                 .replace("final_layer_norm", "norm3").replace("encoder_attn.", "cross_attn."))
        k = k.replace(".fc1.", ".linear1.").replace(".fc2.", ".linear2.")
        out[k] = v
    # nn.MultiheadAttention packs q, k, v into in_proj_{weight,bias}
    for k in [k for k in out if re.search(r"self_attn\.q_proj\.", k)]:
        base, kind = k.split(".q_proj.")
        out[f"{base}.in_proj_{kind}"] = torch.cat(
            [out.pop(f"{base}.q_proj.{kind}"), out.pop(f"{base}.k_proj.{kind}"), out.pop(f"{base}.v_proj.{kind}")]
        )
    return out


@pytest.mark.parametrize("variant", ["multi-scale", "two-stage"])
def test_official_layout_parity(variant, tmp_path):
    hf = make_hf_model(variant, seed=3)
    sd = hub_to_official(hf.state_dict())
    assert any(k.startswith("backbone.0.body.layer4") for k in sd)
    assert any(".in_proj_weight" in k for k in sd)
    args = argparse.Namespace(
        backbone="resnet50", dilation=False, num_feature_levels=hf.config.num_feature_levels,
        with_box_refine=hf.config.with_box_refine, two_stage=hf.config.two_stage, nheads=4,
        dim_feedforward=128, dropout=0.1, enc_n_points=4, dec_n_points=4, num_queries=20, lr=2e-4,
    )
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "args": args, "epoch": 49, "optimizer": {"state": {}, "param_groups": []}}, path)
    assert detect_layout(path) == "official"
    ours = load_model(path)
    assert ours.cfg.variant == variant
    _assert_close(*_run_both(hf, ours))


# --- bad checkpoints -------------------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_official_refuses_code_pickles(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": _Evil()}, path)
    with pytest.raises(WeightsError, match="refusing to load"):
        load_model(path)


def test_missing_and_unexpected_keys_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = make_hf_model("multi-scale")
    save_hub(hf, tmp_path / "hub")
    st = tmp_path / "hub" / "model.safetensors"
    sd = load_file(str(st))
    sd.pop("model.level_embed")
    sd["model.something_new.weight"] = torch.zeros(2)
    save_file(sd, str(st), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as e:
        load_model(tmp_path / "hub")
    msg = str(e.value)
    assert "transformer.level_embed" in msg and "something_new" in msg and "\n" not in msg


def test_truncated_and_garbage_files(tmp_path):
    hf = make_hf_model("single-scale")
    save_hub(hf, tmp_path / "hub")
    st = tmp_path / "hub" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_model(tmp_path / "hub")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="corrupt|not a PyTorch"):
        load_model(junk)
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nope.pth")

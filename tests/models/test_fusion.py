"""The inference-only speed-ups (ddetr_cli/inference.py) against the plain ops they replace."""

from __future__ import annotations

import platform
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ddetr_cli.models import fusion as inference
from ddetr_cli.models.backbone import FrozenBatchNorm2d, ResNet
from ddetr_cli.models.fusion import FastLinear, FusedConv2d, use_fast_linears

X86_LINUX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.skipif(not X86_LINUX, reason="oneDNN ships in the x86-64 Linux torch wheels")
def test_onednn_kernels_are_there():
    # the fast paths below must really be taken on the machines this project runs on
    assert inference._ONEDNN_LINEAR and inference._ONEDNN_CONV


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(7, 32), (2, 300, 32), (1, 1000, 32)])
def test_fast_linear_equals_linear(shape, relu):
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    fast = FastLinear(lin, relu=relu)
    assert fast.weight is lin.weight and fast.bias is lin.bias
    x = torch.randn(*shape)
    ref = F.linear(x, lin.weight, lin.bias)
    ref = ref.relu() if relu else ref
    with torch.inference_mode():
        out = fast(x)
        strided = fast(torch.stack([x, -x], -1)[..., 0])  # x again, as a non-contiguous view
        ops = _ops_run(lambda: fast(x))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(strided, ref, rtol=1e-5, atol=1e-5)
    if inference._ONEDNN_LINEAR:
        assert "mkldnn::_linear_pointwise" in ops
        assert "aten::addmm" not in ops


@pytest.mark.parametrize("shape", [(7, 32), (2, 300, 32)])
def test_linear_plus_adds_the_residual_in_the_epilogue(shape):
    """linear_plus(FastLinear, x, r) = x W^T + b + r, through oneDNN's binary-add epilogue in
    inference (no separate add); a plain nn.Linear, a ReLU linear or autograd add it after."""
    from ddetr_cli.models.fusion import linear_plus

    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    x, r = torch.randn(*shape), torch.randn(*shape[:-1], 48)
    ref = F.linear(x, lin.weight, lin.bias) + r
    with torch.inference_mode():
        ops = _ops_run(lambda: linear_plus(FastLinear(lin), x, r))
        out = linear_plus(FastLinear(lin), x, r)
        plain = linear_plus(lin, x, r)
        relu = linear_plus(FastLinear(lin, relu=True), x, r)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(relu, F.relu(F.linear(x, lin.weight, lin.bias)) + r, rtol=1e-5, atol=1e-5)
    if inference._ONEDNN_LINEAR:
        assert "mkldnn::_linear_pointwise" in ops and "aten::add" not in ops, ops


def test_fast_linear_trains_like_linear():
    """With autograd on it is F.linear: same gradients, and the oneDNN kernel is not used."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    fast = FastLinear(nn.Linear(16, 8), relu=True)
    fast.load_state_dict(lin.state_dict())
    x = torch.randn(5, 16)
    F.relu(lin(x)).square().sum().backward()
    ops = _ops_run(lambda: fast(x).square().sum().backward())
    assert "mkldnn::_linear_pointwise" not in ops
    torch.testing.assert_close(fast.weight.grad, lin.weight.grad)
    torch.testing.assert_close(fast.bias.grad, lin.bias.grad)
    assert list(fast.state_dict()) == ["weight", "bias"]


def test_use_fast_linears_keeps_sharing_and_fuses_the_ffn_relu():
    shared = nn.Linear(4, 4)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.activation, self.linear2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)

        def forward(self, x):
            return self.linear2(self.activation(self.linear1(x)))

    model = nn.Module()
    model.layer = Layer()
    model.heads = nn.ModuleList([shared, shared, shared])
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref_layer, ref_head = model.layer(x), model.heads[2](x)
    use_fast_linears(model)
    assert model.heads[0] is model.heads[1] is model.heads[2] and isinstance(model.heads[2], FastLinear)
    assert model.heads[0].weight is shared.weight
    assert model.layer.linear1.relu and isinstance(model.layer.activation, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), ref_layer)
        torch.testing.assert_close(model.heads[2](x), ref_head)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_fused_conv_equals_conv_add_relu(stride, dilation, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride, dilation, dilation=dilation, bias=False)
    w, b = torch.randn(24, 16, 3, 3) * 0.1, torch.randn(24)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 19, 23).contiguous(memory_format=fmt)
    plain = F.conv2d(x, w, b, stride, dilation, dilation)
    residual = torch.randn_like(plain).contiguous(memory_format=fmt)
    for relu in (False, True):
        fused = FusedConv2d(conv, w.contiguous(memory_format=fmt), b, relu)
        with torch.inference_mode():
            out, out_res = fused(x), fused(x, residual)
            ops = _ops_run(lambda: fused(x, residual))
        act = F.relu if relu else (lambda t: t)
        torch.testing.assert_close(out, act(plain), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_res, act(plain + residual), rtol=1e-5, atol=1e-5)
        if inference._ONEDNN_CONV:
            assert "mkldnn::_convolution_pointwise" in ops and "aten::add" not in ops
        # the fallback (autograd on) computes the same
        torch.testing.assert_close(fused(x.requires_grad_(), residual), act(plain + residual), rtol=1e-5, atol=1e-5)
        x = x.detach()


@pytest.mark.parametrize("depth,dilation", [(18, False), (50, False), (50, True)])
def test_fused_resnet_equals_unfused(depth, dilation):
    """Random (non-identity) BN statistics, so that folding them really changes the weights."""
    torch.manual_seed(0)
    net = ResNet(depth, dilation, width=16).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 96, 130)
    with torch.no_grad():
        ref = net.forward_stages(x)
    net.fuse_bn_().to(memory_format=torch.channels_last)
    assert sum(isinstance(m, FusedConv2d) for m in net.modules()) > depth // 2
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    with torch.inference_mode():
        out = net.forward_stages(x.contiguous(memory_format=torch.channels_last))
    assert ref[-1].std() > 1e-3
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_info_reports_the_cpu_kernels():
    import json

    from typer.testing import CliRunner

    from ddetr_cli.cli.main import app

    r = CliRunner().invoke(app, ["info", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["msda_backend"] in ("compiled", "torch") and data["msda_reason"]
    assert data["cpu_fused_kernels"] == inference.fused_cpu_kernels()
    if X86_LINUX:
        assert data["cpu_fused_kernels"].startswith("oneDNN")

"""Inference-only speed-ups shared by the model families (CPU float32 is where they matter).

* ``optimize_for_inference``: fold the frozen batch norms into their convolutions
  (:class:`FusedConv2d`, which also applies the ReLU and the residual add in oneDNN's epilogue:
  ~0.1 s of the ~1.2 s R50 backbone at 800x1066 here), run the convolutions channels-last, and
  swap every ``nn.Linear`` for a :class:`FastLinear`.
* :class:`FastLinear`: on CPU float32 without autograd, the linear goes through oneDNN's matmul
  with the bias (and the FFN's ReLU) applied in the GEMM's epilogue. ``F.linear`` there is MKL
  ``addmm``, which first copies the bias into the whole output and then runs the GEMM with
  beta=1: measured on this project's 2-vCPU AVX2 machine at the encoder shape of an 800x1066
  image (17,821 tokens), 256->256 takes ~19 ms instead of ~26-37 ms and 1024->256 ~65 ms
  instead of ~85-113 ms. Anything else (grad, autocast, CUDA, other dtypes) is plain ``F.linear``.
* ``to_reduced_precision``: bfloat16 inference on CPUs that have it (AMX, AVX512-BF16): weights
  converted once, the same fused oneDNN kernels in bfloat16, and the heads that produce boxes and
  reference points kept in float32 (:class:`Float32Head`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ddetr_cli.ops.cpu import bf16_support


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear_available()
_ONEDNN_CONV = _ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
# oneDNN has bfloat16 kernels on AVX512-BF16 / AMX CPUs (and AVX-512 ones, by conversion); on an
# AVX2 CPU it has none, and bfloat16 linears fall back to ATen's (about 10x slower than float32)
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if bf16_support()[0] else (torch.float32,)


def _onednn_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the oneDNN kernels apply: CPU float32 (or bfloat16 where oneDNN has it) inference
    (no autograd, no autocast)."""
    return (
        torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in _ONEDNN_DTYPES
        and x.numel() > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
    )


def fused_cpu_kernels() -> str:
    """What CPU float32 inference runs its linears and convolutions with (for ``ddetr info``)."""
    if _ONEDNN_LINEAR and _ONEDNN_CONV and torch.backends.mkldnn.enabled:
        return "oneDNN (bias, ReLU and residual fused into linears and convolutions)"
    return "plain PyTorch ops (this torch build has no oneDNN fused linear/convolution)"


class FastLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state-dict names) with an optional fused ReLU.

    forward(x (..., in_features)) -> (..., out_features), ``relu(x @ W.T + b)`` when ``relu``.
    """

    def __init__(self, linear: nn.Linear, relu: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied
        self.relu = relu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) [, residual (..., out): added in the epilogue, not with ``relu``] -> (..., out)."""
        if _ONEDNN_LINEAR and _onednn_inference(x, self.weight):
            if residual is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "relu" if self.relu else "none", [], "")
            if not self.relu and residual.dtype == x.dtype and residual.is_contiguous():
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        y = F.linear(x, self.weight, self.bias)
        if self.relu:
            y = F.relu(y, inplace=True)
        return y if residual is None else y + residual

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


def linear_plus(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``linear(x) + residual``, the add in the GEMM's epilogue where ``linear`` is a
    :class:`FastLinear` (inference): the residual is read while the output tile is in cache,
    instead of a separate pass over the (S, C) tensors."""
    if isinstance(linear, FastLinear):  # which adds after its ReLU itself where it has one
        return linear(x, residual)
    return linear(x) + residual


class FusedConv2d(nn.Conv2d):
    """A convolution with its batch norm already folded in (so it has a bias), an optional
    residual added and an optional ReLU, all in oneDNN's epilogue on CPU float32 inference.

    forward(x (B, Cin, H, W), residual (B, Cout, H', W') | None) -> relu?(conv(x) + residual).
    Same results as the unfused ops (the epilogue adds and clamps the same float values).
    """

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> None:
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "transposed", "output_padding", "padding_mode"):
            setattr(self, name, getattr(conv, name))
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.relu = relu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        zero_padded = isinstance(self.padding, tuple) and self.padding_mode == "zeros"
        if _ONEDNN_CONV and zero_padded and _onednn_inference(x, self.weight):
            geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            unary = "relu" if self.relu else None
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *geometry, unary or "none", [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, self.weight, self.bias, *geometry, "add", 1.0, unary, [], ""
            )
        y = self._conv_forward(x, self.weight, self.bias)
        if residual is not None:
            y = y + residual
        return F.relu(y, inplace=True) if self.relu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


def use_fast_linears(model: nn.Module) -> nn.Module:
    """Swap every plain ``nn.Linear`` under ``model`` for a :class:`FastLinear` on the same
    parameters. A layer that names its FFN ``linear1`` followed by an ``activation`` ReLU module
    gets the ReLU fused into ``linear1`` (and the ReLU module replaced by identity).
    Shared modules stay shared. Returns ``model``."""
    swapped: dict[int, FastLinear] = {}
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips a module repeated in one ModuleList
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Linear:
                if id(child) not in swapped:
                    swapped[id(child)] = FastLinear(child)
                setattr(parent, name, swapped[id(child)])
    for layer in model.modules():
        lin, act = getattr(layer, "linear1", None), getattr(layer, "activation", None)
        if isinstance(lin, FastLinear) and isinstance(act, nn.ReLU):
            layer.linear1 = FastLinear(lin, relu=True)
            layer.activation = nn.Identity()
    return model


@torch.no_grad()
def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Fold the frozen BNs of a ResNet backbone into their convs, run the backbone and the input
    projections channels-last, and use :class:`FastLinear` everywhere. Same outputs (to float
    rounding). A folded model is for inference only: its parameter layout changed, so it is
    neither trained nor saved (``model.inference_only``). Returns ``model``."""
    model.eval()
    fuse_bn = getattr(model.backbone.body, "fuse_bn_", None)  # a ResNet's; a ViT has no batch norm to fold
    if fuse_bn is not None:
        fuse_bn()
    model.backbone.to(memory_format=torch.channels_last)
    model.input_proj.to(memory_format=torch.channels_last)
    return use_fast_linears(model)


class Float32Head(nn.Module):
    """A module kept in float32 inside a reduced-precision model: forward(*args) -> head(*args with
    every floating tensor in float32), float32. Box deltas, reference points and class logits come
    out of these; a bfloat16 box coordinate would be off by up to 2 px on a 1066-pixel image."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, *args: Any) -> Any:
        return self.head(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))


@torch.no_grad()
def to_reduced_precision(model: nn.Module, dtype: torch.dtype, float32_heads: list[str]) -> nn.Module:
    """Convert an inference model's parameters and buffers to ``dtype`` (bfloat16), except the
    modules named in ``float32_heads`` (dotted attribute paths; a ModuleList has each entry
    wrapped), which stay float32 behind a :class:`Float32Head`. Shared parameters are converted
    once. The model's inputs must then be given in ``dtype``. Returns ``model``."""
    keep: set[int] = set()
    for path in float32_heads:
        *parents, name = path.split(".")
        owner = model
        for p in parents:
            owner = getattr(owner, p)
        head = getattr(owner, name, None)
        if head is None:
            continue
        if isinstance(head, nn.ModuleList):
            for i, entry in enumerate(head):
                if not isinstance(entry, Float32Head):
                    head[i] = Float32Head(entry)
                keep.update(id(t) for t in entry.parameters())
        elif not isinstance(head, Float32Head):
            setattr(owner, name, Float32Head(head))
            keep.update(id(t) for t in head.parameters())
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and t.is_floating_point() and id(t) not in keep and t.dtype != dtype:
                    t.data = t.data.to(dtype)
    return model

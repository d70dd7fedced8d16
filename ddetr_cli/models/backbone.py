"""ResNet backbones with frozen batch norm, as Deformable DETR uses them.

Written here rather than taken from torchvision because torchvision's wheels do not import beside
every torch build the project supports; parameter names follow torchvision/timm (``conv1``,
``bn1``, ``layer1.0.conv1`` ...) so published checkpoints load without renaming inside the body.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ddetr_cli.models.fusion import FusedConv2d

# depth -> (block kind, blocks per stage)
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (buffers, never trained).

    The official model freezes all BN layers because detection batches (2 images per GPU) are
    too small for useful batch statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # torchvision/timm BatchNorm checkpoints carry a counter that frozen BN has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift), each (C,), so that bn(x) = x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1) -> tuple[nn.Conv2d, FrozenBatchNorm2d]:
    pad = dilation * (k - 1) // 2
    return nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False), FrozenBatchNorm2d(cout)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, dilation: int, first_dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, width, 3, stride, first_dilation)
        self.conv2, self.bn2 = conv_bn(width, width, 3, 1, dilation)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if isinstance(self.conv2, FusedConv2d):  # BN, ReLU and residual folded into the convs
            return self.conv2(self.conv1(x), identity)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + identity, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, dilation: int, first_dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, width, 1)
        # ResNet v1.5: the stride sits on the 3x3 conv.
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride, first_dilation)
        self.conv3, self.bn3 = conv_bn(width, width * 4, 1)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if isinstance(self.conv3, FusedConv2d):  # BN, ReLU and residual folded into the convs
            return self.conv3(self.conv2(self.conv1(x)), identity)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return F.relu(self.bn3(self.conv3(out)) + identity, inplace=True)


class ResNet(nn.Module):
    """ResNet body returning the C3, C4, C5 feature maps.

    ``dilation=True`` replaces the stride of the last stage with dilation (the "DC5" variant):
    C5 then has stride 16 instead of 32. ``width`` is the stem's channel count (64 in every
    published ResNet); smaller values make small models for CPU training.
    """

    def __init__(self, depth: int = 50, dilation: bool = False, width: int = 64) -> None:
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"backbone depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        kind, blocks = RESNET_LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1, self.bn1 = conv_bn(3, width, 7, 2)
        cin, cur_dilation = width, 1
        self.channels: list[int] = []
        for i, (n, width) in enumerate(zip(blocks, (width, 2 * width, 4 * width, 8 * width))):
            stride = 1 if i == 0 else 2
            first_dilation = cur_dilation
            if i == 3 and dilation:
                cur_dilation, stride = cur_dilation * 2, 1
            cout = width * block.expansion
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(*conv_bn(cin, cout, 1, stride))
            layers = [block(cin, width, stride, cur_dilation, first_dilation, downsample)]
            layers += [block(cout, width, 1, cur_dilation, cur_dilation, None) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            cin = cout
            self.channels.append(cout)
        self.stage_channels = list(self.channels)  # C2..C5 (DETR's mask head also uses C2)
        self.channels = self.channels[1:]  # C3, C4, C5
        self.strides = [8, 16, 16 if dilation else 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) -> [C3 (B, c3, H/8, W/8), C4 (B, c4, H/16, W/16), C5 (B, c5, H/32 or H/16, ...)]."""
        return self.forward_stages(x)[1:]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) -> [C2 (B, c2, H/4, W/4), C3, C4, C5]: every stage's output."""
        if isinstance(self.conv1, FusedConv2d):
            x = self.conv1(x)
        else:
            x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.max_pool2d(x, 3, 2, 1)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

    @torch.no_grad()
    def fuse_bn_(self) -> "ResNet":
        """Fold every frozen BN into the conv before it, and that conv's ReLU (and the block's
        residual add) into its epilogue: see ``inference.FusedConv2d``. Inference only: the
        parameter layout changes, so a fused model is not saved or trained. Saves a
        multiply-add pass over every feature map and the separate add and ReLU passes."""
        # (owner, conv, bn, ReLU after it): the last conv of a block is followed by add + ReLU
        convs = [(self, "conv1", "bn1", True)]
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                last = 3 if isinstance(m, Bottleneck) else 2
                convs += [(m, f"conv{i}", f"bn{i}", True) for i in range(1, last + 1)]
                if m.downsample is not None:
                    convs.append((m.downsample, "0", "1", False))
        for owner, conv_name, bn_name, relu in convs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            if not isinstance(bn, FrozenBatchNorm2d):
                continue
            scale, shift = bn.scale_shift()
            weight = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
            setattr(owner, conv_name, FusedConv2d(conv, weight, shift.clone(), relu))
            setattr(owner, bn_name, nn.Identity())
        self.fused = True
        return self

    @torch.no_grad()
    def prepare_scratch_(self) -> "ResNet":
        """Make a randomly initialised body trainable without ImageNet weights.

        Frozen BN with identity statistics leaves the net unnormalised, so instead: He-init
        convs, every BN scale/shift becomes a trainable parameter (statistics stay identity, so
        the saved layout is unchanged), the last BN of each residual block starts at zero so
        each block starts as the identity (as in Fixup / "zero-init residual"), and the stem is
        trained too (the reference freezes it only because it comes pre-trained).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(m, FrozenBatchNorm2d):
                for name in ("weight", "bias"):
                    t = getattr(m, name)
                    delattr(m, name)
                    m.register_parameter(name, nn.Parameter(t.detach().clone()))
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                last = m.bn3 if isinstance(m, Bottleneck) else m.bn2
                last.weight.zero_()
        for p in self.parameters():
            p.requires_grad_(True)
        return self

    def freeze_stem(self) -> None:
        """Freeze conv1 and layer1, as the reference recipe trains only layer2..4."""
        for name, p in self.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)

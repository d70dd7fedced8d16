"""Plain ViT backbone with a ViTDet-style simple feature pyramid (Li et al., 2022).

Parameter names are timm's ``VisionTransformer`` ones (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so a
timm ``vit_small_patch16_224`` / ``vit_base_patch16_224`` state dict loads strictly once its
classifier (``head.*``, ``fc_norm.*``) is dropped.

Any input size works: the image is zero-padded on the right/bottom to a multiple of the patch
size, and the absolute position embedding, trained on a 14x14 grid, is resampled to the patch
grid the way timm does with ``dynamic_img_size=True`` (bicubic with antialias on the patch part,
in float32; the class token's embedding is kept as it is).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from ddetr_cli.models.config import VIT_SIZES

PATCH = 16
PRETRAIN_GRID = 14  # 224 / 16: the grid the published position embeddings were trained on
# timm keys of the ImageNet classifier, which a detector has no use for
CLASSIFIER_KEYS = re.compile(r"^(head|fc_norm|head_drop)\.")


def pad_to_patch_multiple(x: torch.Tensor, value: float | bool = 0) -> torch.Tensor:
    """(..., H, W) -> (..., ceil(H/16)*16, ceil(W/16)*16), padded right/bottom with ``value``
    (as timm's ``dynamic_img_pad``); returned unchanged when already a multiple."""
    h, w = x.shape[-2:]
    ph, pw = -h % PATCH, -w % PATCH
    if not (ph or pw):
        return x
    if x.dtype == torch.bool:  # F.pad has no bool kernel
        return F.pad(x.to(torch.uint8), (0, pw, 0, ph), value=int(value)).to(torch.bool)
    return F.pad(x, (0, pw, 0, ph), value=float(value))


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int], old_grid: tuple[int, int]) -> torch.Tensor:
    """pos (1, 1 + gh*gw, C) with the class token first -> (1, 1 + grid[0]*grid[1], C).

    The patch part is interpolated as an image (bicubic, antialias, float32), the class-token
    entry passes through; the same rule as timm's ``resample_abs_pos_embed`` so features match.
    """
    if tuple(grid) == tuple(old_grid):
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    c = pos.shape[-1]
    img = patches.float().reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=False, antialias=True)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c).to(pos.dtype)
    return torch.cat([cls, patches], 1)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, 16h, 16w) -> (B, C, h, w)."""
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused ``qkv`` projection, computed with SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's LayerNorm eps 1e-6, exact GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token and a learned absolute position embedding.

    forward(x (B, 3, H, W)) -> (B, C, ceil(H/16), ceil(W/16)): the final-normed patch tokens as a
    stride-16 map (the class token is dropped). No attention mask: padding tokens take part in
    attention, as in ViTDet; the detector masks them from the deformable layers.
    """

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"ViT embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAIN_GRID**2, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    @classmethod
    def from_name(cls, name: str, depth: int | None = None) -> "VisionTransformer":
        """"vit-small" / "vit-base" (``VIT_SIZES``); ``depth`` overrides the block count (small CPU models)."""
        if name not in VIT_SIZES:
            raise ValueError(f"unknown ViT {name!r}; choose one of {', '.join(VIT_SIZES)}")
        dim, default_depth, heads = VIT_SIZES[name]
        return cls(dim, depth or default_depth, heads)

    @torch.no_grad()
    def _init_weights(self) -> None:
        # timm's from-scratch init: truncated normal (0.02) for linears and the position
        # embedding, a near-zero class token; trainable as is, without an ImageNet start.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pad_to_patch_multiple(x))
        b, c, h, w = x.shape
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        tokens = tokens + resample_pos_embed(self.pos_embed, (h, w), (PRETRAIN_GRID, PRETRAIN_GRID))
        tokens = self.norm(self.blocks(tokens))
        return tokens[:, 1:].transpose(1, 2).reshape(b, c, h, w)

    # The ResNet body's training hooks, so training code treats both bodies alike.
    def prepare_scratch_(self) -> "VisionTransformer":
        """No-op: a fresh ViT (LayerNorm, no frozen BN) is trainable as initialised."""
        return self

    def freeze_stem(self) -> None:
        """No-op: the ViT is trained as a whole (at the backbone learning rate)."""


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple pyramid from the single stride-16 map.

    forward(x (B, C, h, w)) -> one map per stride in ``strides``, in that order, from:
    8: (B, C/2, 2h, 2w) (2x2 transposed conv), 16: (B, C, h, w) (identity),
    32: (B, C, ceil(h/2), ceil(w/2)) (2x2 max-pool). Stride 64 and beyond are the detector's
    extra stride-2 levels, as on the ResNet path; the ViTDet per-level conv stack is left to the
    detector's ``input_proj`` (1x1 conv + GN). Only the requested strides have parameters, so a
    single-scale model holds none it does not use (DDP requires that).
    """

    def __init__(self, dim: int, strides: tuple[int, ...] = (8, 16, 32)) -> None:
        super().__init__()
        if not strides or not set(strides) <= {8, 16, 32}:
            raise ValueError(f"pyramid strides must be among 8, 16, 32, got {strides}")
        self.strides = list(strides)
        self.channels = [dim // 2 if s == 8 else dim for s in strides]
        if 8 in strides:
            self.up = nn.ConvTranspose2d(dim, dim // 2, 2, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = {16: lambda: x, 8: lambda: self.up(x),
                # ceil_mode keeps the last row/column of an odd-sized map instead of dropping it
                32: lambda: F.max_pool2d(x, 2, 2, ceil_mode=True)}
        return [maps[s]() for s in self.strides]

"""Layers both model families use: the sine position embedding, packed-projection self-attention,
the box MLP and inverse sigmoid."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_position_embedding(mask: torch.Tensor, num_feats: int, temperature: float = 10000.0,
                            offset: float = 0.5) -> torch.Tensor:
    """Normalised sine embedding of a padded feature map.

    mask (B, H, W) bool, True on padding -> (B, 2*num_feats, H, W), channels cat(y, x) with
    sin/cos interleaved. Positions are normalised over the valid area; Deformable DETR subtracts
    ``offset`` = 0.5 from the 1-based pixel index first, DETR does not (``offset=0``).
    """
    valid = (~mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = (y - offset) / (y[:, -1:, :] + eps) * scale
    x = (x - offset) / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the packed ``in_proj`` layout of nn.MultiheadAttention
    (what official checkpoints hold), computed with scaled_dot_product_attention."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """qk (N, Q, C) = target + position, v (N, Q, C) = target -> (N, Q, C)."""
        n, q, c = v.shape
        w, b = self.in_proj_weight, self.in_proj_bias
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3)
        heads = lambda t: t.view(n, q, self.n_heads, c // self.n_heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            heads(F.linear(qk, wq, bq)),
            heads(F.linear(qk, wk, bk)),
            heads(F.linear(v, wv, bv)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(n, q, c))


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x

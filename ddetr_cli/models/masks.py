"""DETR's mask head (Carion et al., 2020, DETR-segm), shared by DETR and Deformable DETR: the
attention maps of the final decoder queries over one encoder memory map (``MHAttentionMap``),
refined by a small FPN-style conv head over the backbone's C4, C3, C2 into one mask logit map
per query at stride 4 (``MaskHead``); ``MaskHeadMixin`` holds what training needs to know about
the head (freezing it or everything else).

Parameter names are the official checkpoints' (``bbox_attention.*``, ``mask_head.*``) in both
model families, so a Deformable DETR checkpoint with a mask head reads like a DETR-segm one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MASK_HEAD_PREFIXES = ("bbox_attention.", "mask_head.")


def mask_head_widths(d_model: int, nheads: int) -> list[int]:
    """Channels of the head's five conv blocks: d_model + nheads (features ++ attention maps),
    then d/2, d/4, d/8, d/16 (each under a GroupNorm of min(8, C) groups)."""
    return [d_model + nheads] + [d_model // k for k in (2, 4, 8, 16)]


def check_mask_head(d_model: int, nheads: int) -> None:
    """Raise ValueError unless the head's GroupNorms divide their channels."""
    widths = mask_head_widths(d_model, nheads)
    if d_model % 16 or any(c % min(8, c) for c in widths):
        raise ValueError(f"the mask head needs d_model divisible by 16 and d_model + nheads and d_model/16 "
                         f"divisible by 8 (or d_model/16 < 8); got d_model={d_model}, nheads={nheads}")


class MHAttentionMap(nn.Module):
    """Attention weights (no values) of each query over the encoder memory map, per head.

    The softmax runs jointly over heads and positions, as in the reference. ``scaled`` multiplies
    the probabilities by the number of positions attended (heads x unpadded pixels), so that a
    uniform map reads 1 whatever the image size: DETR's raw probabilities (~2e-3 at 256 px) enter
    the conv head beside features of ~1 and their weights get ~1/200 of the gradient, which 25 COCO
    epochs overcome but a short fine-tune does not (the demo's head, 2000 steps: every query's mask
    the same to 2e-4, mask AP 0.011; scaled, 2000 steps: mask AP 0.261). Counting unpadded pixels
    keeps an image's maps independent of the batch it is padded in."""

    def __init__(self, d_model: int, n_heads: int, scaled: bool = False) -> None:
        super().__init__()
        self.n_heads, self.scaled = n_heads, scaled
        self.q_linear = nn.Linear(d_model, d_model)
        self.k_linear = nn.Linear(d_model, d_model)
        for lin in (self.q_linear, self.k_linear):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, q: torch.Tensor, memory: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """q (B, Q, C); memory (B, C, h, w); padding_mask (B, h, w) -> weights (B, Q, heads, h, w)."""
        b, nq, c = q.shape
        h, w = memory.shape[-2:]
        m = self.n_heads
        qh = self.q_linear(q).view(b, nq, m, c // m) * (c / m) ** -0.5
        # the key projection is a 1x1 conv over the map: the Linear's weights, applied per pixel
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias).view(b, m, c // m, h, w)
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh, k)
        weights = weights.masked_fill(padding_mask[:, None, None], torch.finfo(weights.dtype).min)
        weights = weights.flatten(2).softmax(-1)
        if self.scaled:
            positions = (~padding_mask).flatten(1).sum(1).clamp_min(1) * m  # (B,)
            weights = weights * positions.to(weights.dtype)[:, None, None]
        return weights.view(b, nq, m, h, w)


class MaskHead(nn.Module):
    """Small conv head turning (projected C5 features ++ per-query attention maps) into one mask
    logit map per query at stride 4, adding C4, C3, C2 through 1x1 adapters FPN-style."""

    def __init__(self, dim: int, fpn_dims: list[int], context: int) -> None:
        super().__init__()
        widths = [dim] + mask_head_widths(context, 0)[1:]
        for i in range(5):
            self.add_module(f"lay{i + 1}", nn.Conv2d(widths[max(i - 1, 0)], widths[i], 3, padding=1))
            self.add_module(f"gn{i + 1}", nn.GroupNorm(min(8, widths[i]), widths[i]))
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        for i, c in enumerate(fpn_dims):
            self.add_module(f"adapter{i + 1}", nn.Conv2d(c, widths[i + 1], 1))
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_uniform_(mod.weight, a=1)
                nn.init.zeros_(mod.bias)

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, f"gn{i}")(getattr(self, f"lay{i}")(x)))

    def forward(self, x: torch.Tensor, bbox_mask: torch.Tensor, fpns: list[torch.Tensor]) -> torch.Tensor:
        """x (B, C, h, w); bbox_mask (B, Q, heads, h, w); fpns [C4, C3, C2] of the backbone
        -> (B*Q, 1, H/4, W/4) mask logits."""
        nq = bbox_mask.shape[1]
        x = torch.cat([x.repeat_interleave(nq, 0), bbox_mask.flatten(0, 1)], 1)
        x = self._block(2, self._block(1, x))
        for i, fpn in enumerate(fpns):
            fpn = getattr(self, f"adapter{i + 1}")(fpn).repeat_interleave(nq, 0)
            x = self._block(i + 3, fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest"))
        return self.out_lay(x)


class MaskHeadMixin:
    """What a detector with an optional mask head (``cfg.masks``; modules ``bbox_attention`` and
    ``mask_head``) offers training: freezing either side, and skipping the head when frozen."""

    cfg: object
    bbox_attention: MHAttentionMap
    mask_head: MaskHead

    def mask_head_parameters(self) -> list[nn.Parameter]:
        return list(self.bbox_attention.parameters()) + list(self.mask_head.parameters())

    def freeze_mask_head(self) -> None:
        """Keep the mask head fixed (box-only fine-tuning); training forwards then skip the masks."""
        for p in self.mask_head_parameters():
            p.requires_grad_(False)

    def freeze_detector(self) -> None:
        """Keep everything but the mask head fixed (DETR's second step: the mask head trained on
        a finished detector)."""
        head = {id(p) for p in self.mask_head_parameters()}
        for p in self.parameters():  # type: ignore[attr-defined]
            if id(p) not in head:
                p.requires_grad_(False)

    def masks_wanted(self) -> bool:
        """Whether this forward computes masks: with a mask head, unless training with it frozen
        (box-only fine-tuning skips the head's Q-fold work)."""
        if not self.cfg.masks:  # type: ignore[attr-defined]
            return False
        return not self.training or any(p.requires_grad for p in self.mask_head.parameters())  # type: ignore[attr-defined]


class MaskSource:
    """The mask head's inputs of one training batch, run for chosen queries only: the loss needs
    the masks of the matched queries (a few per image), and the head's convolutions at stride 4
    cost per query, so computing all Q of them would spend most of a mask step on masks no loss
    term reads. Every query's mask depends on its own embedding only (the head mixes no queries),
    so a subset's masks equal those rows of the full output.

    queries (B, Q, C); memory (B, C, h, w); padding_mask (B, h, w); features (B, C, h, w);
    fpns [C4, C3, C2] of the backbone."""

    def __init__(self, model: MaskHeadMixin, queries: torch.Tensor, memory: torch.Tensor, padding_mask: torch.Tensor,
                 features: torch.Tensor, fpns: list[torch.Tensor]) -> None:
        self.model, self.queries, self.memory, self.padding_mask = model, queries, memory, padding_mask
        self.features, self.fpns = features, fpns

    def __call__(self, b: int, query_idx: torch.Tensor) -> torch.Tensor:
        """Image ``b``'s masks of the queries ``query_idx`` (K,) -> (K, H/4, W/4) mask logits."""
        if not len(query_idx):
            return self.queries.new_zeros(0, *self.fpns[-1].shape[-2:])
        one = slice(b, b + 1)
        q = self.queries[one, query_idx.to(self.queries.device)]
        attn = self.model.bbox_attention(q, self.memory[one], self.padding_mask[one])
        return self.model.mask_head(self.features[one], attn, [f[one] for f in self.fpns])[:, 0]

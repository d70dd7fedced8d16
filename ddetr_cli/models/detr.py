"""DETR (Carion et al., 2020): ResNet C5 features, a post-norm transformer encoder/decoder with
learned queries, softmax classification with a "no object" class, and the optional mask head
(DETR-segm: attention maps of the queries over the encoder memory, refined by a small FPN-style
conv head on C4, C3, C2).

Parameter names follow the official checkpoints (``transformer.encoder.layers.N.self_attn.
in_proj_weight``, ``multihead_attn``, ``class_embed``, ``bbox_attention``, ``mask_head``) minus
the ``backbone.0`` nesting and the panoptic ``detr.`` prefix; ``weights/detr.py`` renames the
official and transformers layouts to these.

Conventions as in ``deformable_detr.py``: ``mask`` is True on padding; boxes are (cx, cy, w, h) normalised
to the unpadded image.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ddetr_cli.models.backbone import ResNet
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.fusion import optimize_for_inference
from ddetr_cli.models.layers import MLP, SelfAttention, sine_position_embedding
from ddetr_cli.models.masks import MaskHead, MaskHeadMixin, MHAttentionMap


class Attention(SelfAttention):
    """Multi-head attention with separate query / key / value inputs and a key padding mask
    (the packed ``in_proj`` layout of nn.MultiheadAttention, as official checkpoints hold it)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (N, L, C); k, v (N, S, C); key_padding_mask (N, S) True on padding -> (N, L, C)."""
        n, lq, c = q.shape
        s = k.shape[1]
        h = self.n_heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        qh = F.linear(q, wq, bq).view(n, lq, h, c // h).transpose(1, 2)
        kh = F.linear(k, wk, bk).view(n, s, h, c // h).transpose(1, 2)
        vh = F.linear(v, wv, bv).view(n, s, h, c // h).transpose(1, 2)
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, c))


class EncoderLayer(nn.Module):
    """Post-norm self-attention + FFN; the position is added to queries and keys only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.nheads, cfg.dropout)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation = nn.ReLU()  # a module, so inference can fuse it into linear1

    def forward(self, src: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """src, pos (N, S, C); padding_mask (N, S) -> (N, S, C)."""
        qk = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(qk, qk, src, padding_mask)))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class DecoderLayer(nn.Module):
    """Post-norm self-attention over the queries, cross-attention to the memory, FFN."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.nheads, cfg.dropout)
        self.multihead_attn = Attention(d, cfg.nheads, cfg.dropout)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation = nn.ReLU()

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                padding_mask: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos (N, Q, C); memory, pos (N, S, C); padding_mask (N, S) -> (N, Q, C)."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt)))
        attn = self.multihead_attn(tgt + query_pos, memory + pos, memory, padding_mask)
        tgt = self.norm2(tgt + self.dropout(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.d_model)  # applied to every layer's output (all feed the heads)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)


class DETR(MaskHeadMixin, nn.Module):
    """DETR detector (and DETR-segm with ``cfg.masks``).

    forward(images (B, 3, H, W) normalised, mask (B, H, W) bool True on padding) -> dict with
    ``logits`` (B, Q, num_classes + 1; the last column is "no object"), ``boxes`` (B, Q, 4)
    cxcywh in [0, 1], ``aux`` (the earlier decoder layers' {logits, boxes}) and, with the mask
    head, ``masks`` (B, Q, H/4, W/4) mask logits over the padded input.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.backbone = nn.Module()
        self.backbone.body = ResNet(cfg.backbone_depth, cfg.dilation, cfg.backbone_width)
        self.backbone.body.freeze_stem()
        stages = self.backbone.body.stage_channels
        self.input_proj = nn.Conv2d(stages[-1], d, 1)
        self.transformer = Transformer(cfg)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        if cfg.masks:
            self.bbox_attention = MHAttentionMap(d, cfg.nheads, scaled=cfg.mask_attention == "scaled")
            self.mask_head = MaskHead(d + cfg.nheads, stages[-2::-1], d)

    # what stays float32 in reduced-precision inference (``fusion.to_reduced_precision``)
    FLOAT32_HEADS = ("class_embed", "bbox_embed")

    def optimize_for_inference(self) -> "DETR":
        """BNs folded, convs channels-last, oneDNN linears: see ``inference.optimize_for_inference``."""
        return optimize_for_inference(self)

    @property
    def inference_only(self) -> bool:
        return bool(getattr(self.backbone.body, "fused", False))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        b = images.shape[0]
        if mask is None:
            mask = torch.zeros(b, *images.shape[-2:], dtype=torch.bool, device=images.device)
        if self.inference_only:
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.backbone.body.forward_stages(images)
        c5 = feats[-1]
        fmask = F.interpolate(mask[None].float(), size=c5.shape[-2:]).to(torch.bool)[0]
        src = self.input_proj(c5)
        pos = sine_position_embedding(fmask, self.cfg.d_model // 2, offset=0.0).to(src.dtype)
        src_flat = src.flatten(2).transpose(1, 2)
        pos_flat = pos.flatten(2).transpose(1, 2)
        mask_flat = fmask.flatten(1)

        memory = src_flat
        for layer in self.transformer.encoder.layers:
            memory = layer(memory, pos_flat, mask_flat)

        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        dec = self.transformer.decoder
        hs = []
        for layer in dec.layers:
            tgt = layer(tgt, query_pos, memory, pos_flat, mask_flat)
            hs.append(dec.norm(tgt))  # the stream itself stays un-normed; the heads see normed copies
        hs_all = torch.stack(hs)
        logits_all = self.class_embed(hs_all)
        boxes_all = self.bbox_embed(hs_all).sigmoid()
        out: dict = {"logits": logits_all[-1], "boxes": boxes_all[-1],
                     "aux": [{"logits": lg, "boxes": bx} for lg, bx in zip(logits_all[:-1], boxes_all[:-1])]}
        if self.masks_wanted():
            h, w = c5.shape[-2:]
            attn = self.bbox_attention(hs[-1], memory.transpose(1, 2).reshape(b, -1, h, w), fmask)
            seg = self.mask_head(src, attn, [feats[2], feats[1], feats[0]])
            out["masks"] = seg.view(b, self.cfg.num_queries, *seg.shape[-2:])
        return out

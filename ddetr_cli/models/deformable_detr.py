"""Deformable DETR (Zhu et al., 2020): backbone, deformable transformer and detection heads.

Parameter names follow the official checkpoints (``transformer.encoder.layers.N.self_attn...``)
minus the ``backbone.0`` nesting, so the official layout loads with little renaming and the
transformers layout with a fixed table (see ``weights/load.py``).

Conventions: ``mask`` is True on padding; boxes are (cx, cy, w, h) normalised to the unpadded
image; sampling locations are (x, y) in [0, 1].
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from ddetr_cli.models.backbone import ResNet
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.fusion import linear_plus, optimize_for_inference
from ddetr_cli.models.layers import MLP, SelfAttention, inverse_sigmoid, sine_position_embedding
from ddetr_cli.models.masks import MaskHead, MaskHeadMixin, MaskSource, MHAttentionMap
from ddetr_cli.models.vit import SimpleFeaturePyramid, VisionTransformer, pad_to_patch_multiple
from ddetr_cli.ops.msda import ms_deform_attn


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of reference points, sampling locations, proposals and boxes for features of
    ``dtype``: float32 for bfloat16 / float16 features (a bfloat16 coordinate near 1 is only good to
    2**-9, a quarter pixel on a 134-pixel level and 2 px on a 1066-pixel image), else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class UnprojectedValue:
    """The decoder's value input before ``value_proj``, for sampling first and projecting after.

    Bilinear sampling and the attention-weighted sum are linear, so sampling the 256-channel
    memory and then applying each head's slice of ``value_proj`` equals projecting all S
    positions first and sampling the projected heads (up to float rounding). The decoder's 300
    queries sample 300 x M x L x P points, far fewer than the 17,821 positions of an 800x1066
    image, so this skips ~95% of each decoder layer's value GEMM (40 -> 9 ms a layer on the
    2-core AVX2 EPYC). The bias: a corner outside its level or on padding reads a zero row, in
    the reference as here, so ``value_proj``'s bias counts with the weight of the corners that
    were read, which the extra channel of ones (zero on padding) samples.

    rows (N, S, 1, C + 1): ``cat(memory, 1)``, zeroed on padding, in the decoder's dtype.
    """

    def __init__(self, memory: torch.Tensor, padding_mask: torch.Tensor | None, dtype: torch.dtype) -> None:
        n, s, c = memory.shape
        rows = torch.empty(n, s, c + 1, dtype=dtype, device=memory.device)
        rows[..., :c] = memory
        rows[..., c] = 1.0
        if padding_mask is not None:
            rows.masked_fill_(padding_mask[..., None], 0.0)
        self.rows = rows.view(n, s, 1, c + 1)

    @staticmethod
    def pays(num_queries: int, num_positions: int, attn: "MSDeformAttn") -> bool:
        """Whether sampling first costs less: multiply-adds of the gathers (4 corners of every
        point, C + 1 channels; counted 4x, a gather being slower than a GEMM's multiply-add) and
        of the per-head projections, against the value GEMM over every position."""
        c, points = attn.d_model, attn.n_heads * attn.n_levels * attn.n_points
        sample_first = num_queries * (4 * 4 * points * (c + 1) + c * c)
        return sample_first < num_positions * c * c


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples P points per head and level."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # Start the points on rays in M directions, point k at distance k+1, like the paper.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_in: torch.Tensor | UnprojectedValue,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (N, Lq, C) with position added; reference_points (N, Lq, L, 2|4) normalised;
        value_in (N, S, C), or an :class:`UnprojectedValue` of it (padding already applied);
        spatial_shapes (L, 2) int64 (H, W); level_start_index (L,); padding_mask (N, S) True on
        padding; residual (N, Lq, C), added to the output -> (N, Lq, C)."""
        n, lq, _ = query.shape
        m, nl, p = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(n, lq, m, nl, p, 2)
        # probabilities in float32 beside reduced-precision features: the op reads them so, and
        # torch's bfloat16 softmax over 16 values is ~2x slower on CPU than float32's
        weights = self.attention_weights(query).view(n, lq, m, nl * p).softmax(-1, dtype=geometry_dtype(query.dtype))
        weights = weights.view(n, lq, m, nl, p)
        if reference_points.shape[-1] == 2:
            # loc = ref + offset / (W_l, H_l), computed on flat rows in one pass (addcmul): the
            # 6-d broadcast of the plain expression is several times slower on CPU at encoder
            # sizes, and a multiply then an add reads and writes the 4.6 M locations twice
            inv = 1.0 / torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(reference_points.dtype)
            scale = inv[None, :, None, :].expand(m, nl, p, 2).reshape(m, nl, p * 2)
            ref = reference_points.reshape(n * lq, 1, nl, 1, 2).expand(n * lq, 1, nl, p, 2).reshape(n * lq, 1, nl, p * 2)
            loc = torch.addcmul(ref, offsets.reshape(n * lq, m, nl, p * 2), scale).view(n, lq, m, nl, p, 2)
        else:
            loc = (
                reference_points[:, :, None, :, None, :2]
                + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        if isinstance(value_in, UnprojectedValue):
            out = self._sample_then_project(value_in, spatial_shapes, level_start_index, loc, weights)
        else:
            s = value_in.shape[1]
            value = self.value_proj(value_in)
            if padding_mask is not None:
                value = value.masked_fill(padding_mask[..., None], 0.0)
            value = value.view(n, s, m, self.d_model // m)
            # locations and weights stay float32 beside a reduced-precision value (the op takes both)
            out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights)
        return self.output_proj(out) if residual is None else linear_plus(self.output_proj, out, residual)

    def _sample_then_project(self, value: UnprojectedValue, spatial_shapes: torch.Tensor,
                             level_start_index: torch.Tensor, loc: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """loc (N, Lq, M, L, P, 2), weights (N, Lq, M, L, P) -> (N, Lq, C): every (query, head)
        pair samples the memory rows as a one-head query, then each head's value_proj slice."""
        n, lq, m, nl, p, _ = loc.shape
        c = self.d_model
        rows = value.rows
        sampled = ms_deform_attn(rows, spatial_shapes, level_start_index, loc.reshape(n, lq * m, 1, nl, p, 2),
                                 weights.reshape(n, lq * m, 1, nl, p)).view(n, lq, m, c + 1)
        w = self.value_proj.weight
        sampled = sampled.to(w.dtype)
        out = torch.einsum("nqmc,mdc->nqmd", sampled[..., :c], w.view(m, c // m, c))
        out = out + sampled[..., c:] * self.value_proj.bias.view(m, c // m)
        return out.reshape(n, lq, c)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = MSDeformAttn(d, cfg.num_feature_levels, cfg.nheads, cfg.enc_n_points)
        self.norm1 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation = nn.ReLU(inplace=True)  # a module, so inference can fuse it into linear1

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos (N, S, C); reference_points (N, S, L, 2) -> (N, S, C)."""
        if not self.training:
            # no dropout between a sublayer and its residual: the adds go into the GEMMs' epilogues
            src = self.norm1(self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                                            padding_mask, residual=src))
            return self.norm2(linear_plus(self.linear2, self.activation(self.linear1(src)), src))
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cross_attn = MSDeformAttn(d, cfg.num_feature_levels, cfg.nheads, cfg.dec_n_points)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = SelfAttention(d, cfg.nheads, cfg.dropout)
        self.norm2 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask):
        """tgt, query_pos (N, Q, C); reference_points (N, Q, L, 2|4); memory (N, S, C) -> (N, Q, C)."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, tgt)))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask)
        tgt = self.norm1(tgt + self.dropout(attn))
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
        # Set by DeformableDETR when refining boxes / two-stage (shared with the output heads,
        # as in the official checkpoints, which therefore list them twice).
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        nn.init.normal_(self.level_embed)
        if cfg.two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.pos_trans = nn.Linear(2 * d, 2 * d)
            self.pos_trans_norm = nn.LayerNorm(2 * d)
        else:
            self.reference_points = nn.Linear(d, 2)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)


class DeformableDETR(MaskHeadMixin, nn.Module):
    """Deformable DETR detector.

    forward(images (B, 3, H, W) normalised, mask (B, H, W) bool True on padding) -> dict with
    ``logits`` (B, Q, num_classes), ``boxes`` (B, Q, 4) cxcywh in [0, 1], ``aux`` (list of the
    earlier decoder layers' {logits, boxes}), for two-stage, ``enc`` {logits (B, S, C),
    boxes (B, S, 4)} of the encoder proposals and, with the mask head (``cfg.masks``), ``masks``
    (B, Q, H/4, W/4) mask logits over the padded input (in training ``mask_source``, a
    ``masks.MaskSource`` that computes the masks of the queries the loss matched).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.backbone = nn.Module()
        if cfg.backbone == "resnet":
            self.backbone.body = ResNet(cfg.backbone_depth, cfg.dilation, cfg.backbone_width)
            self.backbone.body.freeze_stem()
            levels = self.backbone.body.channels
        else:
            # ViT: timm names under backbone.body (trained at the backbone lr); the pyramid is new
            # in every model, so it sits outside ``backbone`` and trains at the full lr.
            self.backbone.body = VisionTransformer.from_name(cfg.backbone, cfg.vit_depth)
            # single-scale takes the last level, stride 32, as with a ResNet
            strides = (8, 16, 32) if cfg.num_feature_levels > 1 else (32,)
            self.pyramid = SimpleFeaturePyramid(self.backbone.body.embed_dim, strides)
            levels = self.pyramid.channels
        body_channels = levels if cfg.num_feature_levels > 1 else levels[-1:]
        projs = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in body_channels]
        cin = body_channels[-1]
        for _ in range(cfg.num_feature_levels - len(body_channels)):
            projs.append(nn.Sequential(nn.Conv2d(cin, d, 3, 2, 1), nn.GroupNorm(32, d)))
            cin = d
        self.input_proj = nn.ModuleList(projs)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.transformer = Transformer(cfg)
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)

        class_embed = nn.Linear(d, cfg.num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        bbox_embed = MLP(d, d, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        num_pred = cfg.dec_layers + (1 if cfg.two_stage else 0)
        if cfg.with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0 if cfg.two_stage else -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        if cfg.two_stage:
            self.transformer.decoder.class_embed = self.class_embed
        if cfg.masks:
            # DETR's head on the level that C5 feeds (stride 32; the only level of single-scale):
            # the same map DETR-segm attends over, whose attention maps are the cheapest (S/1024
            # positions) and whose projected features start the head's FPN, which then adds C4,
            # C3 and C2 on the way to stride 4. The extra stride-64 level is coarser than the
            # FPN's start and the stride-8 level would make the Q-fold attention maps 16x larger.
            self.mask_level = len(body_channels) - 1
            stages = self.backbone.body.stage_channels
            self.bbox_attention = MHAttentionMap(d, cfg.nheads, scaled=cfg.mask_attention == "scaled")
            self.mask_head = MaskHead(d + cfg.nheads, stages[-2::-1], d)

    # Decoder cross-attention samples the memory before projecting it (UnprojectedValue):
    # None = where it costs less, in CPU inference (without autograd: the one-head op's backward
    # would run on one thread; on CUDA the value GEMM is cheap); True / False force it (tests).
    sample_first: bool | None = None

    # what stays float32 in reduced-precision inference (``fusion.to_reduced_precision``)
    FLOAT32_HEADS = ("class_embed", "bbox_embed", "transformer.reference_points", "transformer.decoder.layers")

    def optimize_for_inference(self) -> "DeformableDETR":
        """BNs folded, convs channels-last, oneDNN linears: see ``inference.optimize_for_inference``."""
        return optimize_for_inference(self)

    @property
    def inference_only(self) -> bool:
        return bool(getattr(self.backbone.body, "fused", False))

    # -- features ---------------------------------------------------------------------------
    def _levels(self, images: torch.Tensor, mask: torch.Tensor, stages: list | None = None):
        """-> (sources [(B, d, H_l, W_l)] and masks [(B, H_l, W_l)] of every feature level).
        ``stages``, when given a list, receives the ResNet's C2..C5 (the mask head's FPN)."""
        if self.inference_only:
            # channels-last convs; the flattened (B, HW, C) tokens are then views, not copies
            images = images.contiguous(memory_format=torch.channels_last)
        if isinstance(self.backbone.body, ResNet):
            if stages is None:
                feats = self.backbone.body(images)
            else:
                stages.extend(self.backbone.body.forward_stages(images))
                feats = stages[1:]
        else:
            feats = self.pyramid(self.backbone.body(images))
            # the ViT sees the image padded to whole patches: so does the mask
            mask = pad_to_patch_multiple(mask, value=True)
        if self.cfg.num_feature_levels == 1:
            feats = feats[-1:]
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for lvl in range(len(srcs), self.cfg.num_feature_levels):
            srcs.append(self.input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1]))
        masks = [F.interpolate(mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
        return srcs, masks

    @staticmethod
    def _valid_ratios(mask: torch.Tensor) -> torch.Tensor:
        """mask (B, H, W) True on padding -> (B, 2) valid fraction (w, h)."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float() / h
        valid_w = (~mask[:, 0, :]).sum(1).float() / w
        return torch.stack([valid_w, valid_h], -1)

    @staticmethod
    def _encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """valid_ratios (B, L, 2) -> (B, S, L, 2): pixel centres of every level, in the
        coordinates of each level's valid area."""
        refs = []
        for lvl, (h, w) in enumerate(shapes):
            dev = valid_ratios.device
            ry, rx = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, device=dev), torch.linspace(0.5, w - 0.5, w, device=dev), indexing="ij"
            )
            ry = ry.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            rx = rx.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((rx, ry), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def _position_embedding(self, masks: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """masks per level (B, H_l, W_l) -> (B, S, C): sine embedding plus the level embedding."""
        level_embed = self.transformer.level_embed
        return torch.cat(
            [
                sine_position_embedding(m, self.cfg.d_model // 2).to(dtype).flatten(2).transpose(1, 2)
                + level_embed[lvl].view(1, 1, -1)
                for lvl, m in enumerate(masks)
            ],
            1,
        )

    def _unpadded_geometry(self, shapes: tuple, dtype: torch.dtype, geo: torch.dtype,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(position embedding (1, S, C), encoder reference points (1, S, L, 2)) of an unpadded
        input with these level shapes, cached (a few shapes) on an inference-only model."""
        cache = self.__dict__.setdefault("_geometry_cache", {})
        key = (shapes, dtype, geo, str(device))
        if key not in cache:
            masks = [torch.zeros(1, h, w, dtype=torch.bool, device=device) for h, w in shapes]
            ratios = torch.ones(1, len(shapes), 2, dtype=geo, device=device)
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[key] = (self._position_embedding(masks, dtype), self._encoder_reference_points(list(shapes), ratios).to(geo))
        return cache[key]

    # -- two-stage proposals ----------------------------------------------------------------
    def _proposals(self, memory: torch.Tensor, padding_mask: torch.Tensor, shapes: list[tuple[int, int]]):
        """memory (B, S, C), padding_mask (B, S) -> (object queries (B, S, C), proposal logits (B, S, 4))."""
        b = memory.shape[0]
        geo = geometry_dtype(memory.dtype)
        props, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            m = padding_mask[:, start : start + h * w].view(b, h, w)
            valid_h = (~m[:, :, 0]).sum(1)
            valid_w = (~m[:, 0, :]).sum(1)
            gy, gx = torch.meshgrid(
                torch.arange(h, dtype=geo, device=memory.device),
                torch.arange(w, dtype=geo, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([gx, gy], -1)[None].expand(b, -1, -1, -1)
            scale = torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2).to(geo)
            grid = (grid + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * (2.0**lvl))
            props.append(torch.cat([grid, wh], -1).view(b, -1, 4))
            start += h * w
        props = torch.cat(props, 1)
        valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
        props = torch.log(props / (1 - props))
        invalid = padding_mask[..., None] | ~valid
        props = props.masked_fill(invalid, float("inf"))
        queries = memory.masked_fill(invalid, 0.0)
        t = self.transformer
        return t.enc_output_norm(t.enc_output(queries)), props

    def _proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """proposals (B, K, 4) logits -> (B, K, 2*d) sine embedding of the sigmoid boxes."""
        num_feats = self.cfg.d_model // 2
        dim_t = torch.arange(num_feats, dtype=proposals.dtype, device=proposals.device)
        dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
        pos = proposals.sigmoid()[..., None] * (2 * math.pi) / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)

    def _decoder_value(self, memory: torch.Tensor, padding: torch.Tensor | None,
                       num_queries: int) -> torch.Tensor | UnprojectedValue:
        """The value input of the decoder's cross-attention: memory (N, S, C), or its
        :class:`UnprojectedValue` (built once for all layers) where ``sample_first`` says so."""
        layers = self.transformer.decoder.layers
        if not len(layers):
            return memory
        first = getattr(layers[0], "head", layers[0])  # behind a Float32Head in bfloat16 inference
        attn = first.cross_attn
        wanted = self.sample_first
        if wanted is None:
            wanted = (memory.device.type == "cpu" and not torch.is_grad_enabled()
                      and UnprojectedValue.pays(num_queries, memory.shape[1], attn))
        if not wanted:
            return memory
        return UnprojectedValue(memory, padding, attn.value_proj.weight.dtype)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        b = images.shape[0]
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        with_masks = self.masks_wanted()
        stages: list | None = [] if with_masks else None
        srcs, masks = self._levels(images, mask, stages)
        t = self.transformer
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=images.device)
        level_start = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        # reference points, proposals and boxes: float32 even when the features are bfloat16
        geo = geometry_dtype(src_flat.dtype)
        valid_ratios = torch.stack([self._valid_ratios(m) for m in masks], 1).to(geo)

        # An unpadded CPU batch (any single image) skips masking the values in every layer; on
        # CUDA the check would cost a sync, so the mask is always applied there.
        padding = None if mask_flat.device.type == "cpu" and not mask_flat.any() else mask_flat
        if padding is None and self.inference_only:
            # frozen weights, no padding: position embedding and reference points depend on the
            # level shapes alone (a video's frames, a benchmark's repeats share them)
            pos_flat, ref = self._unpadded_geometry(tuple(shapes), src_flat.dtype, geo, images.device)
            ref = ref.expand(b, -1, -1, -1)
        else:
            pos_flat = self._position_embedding(masks, src_flat.dtype)
            ref = self._encoder_reference_points(shapes, valid_ratios).to(geo)

        # encoder
        memory = src_flat
        for layer in t.encoder.layers:
            memory = layer(memory, pos_flat, ref, spatial_shapes, level_start, padding)

        # queries
        out: dict = {}
        d = self.cfg.d_model
        if self.cfg.two_stage:
            queries, proposals = self._proposals(memory, mask_flat, shapes)
            enc_logits = self.class_embed[-1](queries)
            enc_coords = self.bbox_embed[-1](queries) + proposals
            out["enc"] = {"logits": enc_logits, "boxes": enc_coords.sigmoid()}
            k = min(self.cfg.num_queries, enc_logits.shape[1])
            top = torch.topk(enc_logits[..., 0], k, dim=1)[1]
            top_coords = torch.gather(enc_coords, 1, top[..., None].expand(-1, -1, 4)).detach()
            reference = top_coords.sigmoid()
            pos_trans = t.pos_trans_norm(t.pos_trans(self._proposal_pos_embed(top_coords).to(memory.dtype)))
            query_pos, tgt = torch.split(pos_trans, d, dim=2)
        else:
            query_pos, tgt = torch.split(self.query_embed.weight, d, dim=1)
            query_pos = query_pos[None].expand(b, -1, -1)
            tgt = tgt[None].expand(b, -1, -1)
            reference = t.reference_points(query_pos).sigmoid()

        # decoder: each layer predicts from its own reference; with refinement the next
        # reference is the (detached) refined box.
        value = self._decoder_value(memory, padding, tgt.shape[1])
        logits_all, boxes_all = [], []
        for lvl, layer in enumerate(t.decoder.layers):
            ratios = valid_ratios if reference.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            tgt = layer(tgt, query_pos, reference[:, :, None] * ratios[:, None], value, spatial_shapes, level_start, padding)
            delta = self.bbox_embed[lvl](tgt)
            ref_logit = inverse_sigmoid(reference)
            if reference.shape[-1] == 4:
                coords = (delta + ref_logit).sigmoid()
            else:
                coords = torch.cat([delta[..., :2] + ref_logit, delta[..., 2:]], -1).sigmoid()
            logits_all.append(self.class_embed[lvl](tgt))
            boxes_all.append(coords)
            if self.cfg.with_box_refine:
                reference = coords.detach()
        out["logits"], out["boxes"] = logits_all[-1], boxes_all[-1]
        out["aux"] = [{"logits": lg, "boxes": bx} for lg, bx in zip(logits_all[:-1], boxes_all[:-1])]
        if with_masks:
            lvl = self.mask_level
            h, w = shapes[lvl]
            start = int(level_start[lvl])
            level_memory = memory[:, start : start + h * w].transpose(1, 2).reshape(b, -1, h, w)
            queries = tgt.to(level_memory.dtype)
            fpns = [stages[2], stages[1], stages[0]]
            if self.training:
                # the loss needs the matched queries' masks only (a few of Q): it asks for them
                out["mask_source"] = MaskSource(self, queries, level_memory, masks[lvl], srcs[lvl], fpns)
            else:
                attn = self.bbox_attention(queries, level_memory, masks[lvl])
                seg = self.mask_head(srcs[lvl], attn, fpns)
                out["masks"] = seg.view(b, tgt.shape[1], *seg.shape[-2:])
        return out

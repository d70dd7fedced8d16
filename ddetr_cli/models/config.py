"""Model configuration: one dataclass for the five Deformable DETR variants and DETR."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ddetr_cli.formats.labels import LabelTable

# The five published variants, as overrides of the multi-scale defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "single-scale": {"num_feature_levels": 1},
    "single-scale-dc5": {"num_feature_levels": 1, "dilation": True},
    "multi-scale": {},
    "box-refine": {"with_box_refine": True},
    "two-stage": {"with_box_refine": True, "two_stage": True},
    # the original DETR (Carion et al., 2020): C5 only, 100 queries, 2048-wide feed-forward
    "detr": {"arch": "detr", "num_feature_levels": 1, "num_queries": 100, "dim_feedforward": 2048},
    "detr-dc5": {"arch": "detr", "num_feature_levels": 1, "num_queries": 100, "dim_feedforward": 2048, "dilation": True},
}


ARCHS = ("deformable-detr", "detr")
# how the mask head's attention maps enter its convolutions (see ModelConfig)
MASK_ATTENTION = ("softmax", "scaled")
BACKBONES = ("resnet", "vit-small", "vit-base")
# ViT backbones: name -> (embed_dim, depth, num_heads), mlp ratio 4, patch 16 (timm's vit_*_patch16_224)
VIT_SIZES: dict[str, tuple[int, int, int]] = {"vit-small": (384, 12, 6), "vit-base": (768, 12, 12)}


@dataclass
class ModelConfig:
    """Hyper-parameters of a detector (defaults: the official multi-scale R50 Deformable DETR).

    ``arch`` picks the model family: "deformable-detr" (model.DeformableDETR) or "detr" (the
    original DETR; the deformable-only fields are then unused). ``backbone`` is "resnet" (depth
    from ``backbone_depth``) or a ViT ("vit-small", "vit-base"; ``vit_depth`` overrides its 12
    blocks, for small CPU models). ``masks`` adds DETR's mask head (``models.masks``; either family,
    ResNet backbones). ``mask_attention`` is how the head's per-query attention maps enter its
    convolutions: "softmax", DETR's probabilities (the published checkpoints'), or "scaled", the
    same multiplied by the number of attended positions (heads x valid pixels: 1 = uniform), which
    a new head learns from in a short fine-tune (``models.masks.MHAttentionMap``).
    """

    arch: str = "deformable-detr"
    backbone: str = "resnet"
    masks: bool = False
    mask_attention: str = "softmax"
    num_classes: int = 91
    class_names: list[str] = field(default_factory=list)
    # the category id of each label, for models trained on a COCO dataset (its own ids); empty:
    # the rule of labels.LabelTable (COCO table, else 1..C)
    category_ids: list[int] = field(default_factory=list)
    # the category ids that are "stuff" (panoptic: one segment per class and image), from the
    # dataset's isthing flags; empty: see labels.LabelTable
    stuff_ids: list[int] = field(default_factory=list)
    backbone_depth: int = 50
    backbone_width: int = 64  # stem channels; 64 in published ResNets, less for small CPU models
    vit_depth: int | None = None  # ViT blocks; None = the published 12
    dilation: bool = False
    num_feature_levels: int = 4
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    with_box_refine: bool = False
    two_stage: bool = False
    # short side the model was trained at: the default input size of detect/video/eval
    imgsz: int = 800
    # tracking thresholds measured for this model (the defaults of --track-high / --track-low;
    # None: engine.track.TrackSettings' own). A model's scores set them: DETRs score flatter than YOLOs
    track_high: float | None = None
    track_low: float | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.mask_attention not in MASK_ATTENTION:
            raise ValueError(f"mask_attention must be one of {', '.join(MASK_ATTENTION)}, got {self.mask_attention!r}")
        if self.masks:
            if self.backbone != "resnet":  # the head's FPN takes C2..C4 of a ResNet
                raise ValueError("masks (the mask head) need a ResNet backbone")
            from ddetr_cli.models.masks import check_mask_head  # here: masks.py loads torch, the CLI's --help must not

            check_mask_head(self.d_model, self.nheads)
        if self.two_stage and not self.with_box_refine:
            # The published two-stage model always refines; the heads' sharing assumes it.
            raise ValueError("two_stage requires with_box_refine")
        if self.d_model % self.nheads:
            raise ValueError(f"d_model={self.d_model} must be divisible by nheads={self.nheads}")
        if self.arch == "deformable-detr" and self.d_model % 32:
            raise ValueError(f"d_model={self.d_model} must be divisible by 32 (GroupNorm of the input projections)")
        if self.arch == "detr":
            self._check_detr()
        if self.backbone_depth not in (18, 34, 50, 101):
            raise ValueError(f"backbone_depth must be 18, 34, 50 or 101, got {self.backbone_depth}")
        if self.backbone_width < 8 or self.backbone_width % 8:
            raise ValueError(f"backbone_width must be a multiple of 8, got {self.backbone_width}")
        if self.dilation and self.backbone != "resnet":
            raise ValueError("dilation (the DC5 variant) applies to the ResNet backbone only")
        if self.vit_depth is not None and (self.vit_depth < 1 or self.backbone == "resnet"):
            raise ValueError(f"vit_depth ({self.vit_depth}) must be >= 1, with a ViT backbone")
        if self.num_feature_levels < 1:
            raise ValueError("num_feature_levels must be >= 1")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.category_ids and len(self.category_ids) != self.num_classes:
            raise ValueError(f"{len(self.category_ids)} category ids for {self.num_classes} classes")
        for name in ("track_high", "track_low"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in 0..1, got {v}")
        if self.track_high is not None and self.track_low is not None and self.track_low > self.track_high:
            raise ValueError(f"track_low ({self.track_low}) must not be above track_high ({self.track_high})")

    def _check_detr(self) -> None:
        if self.backbone != "resnet":
            raise ValueError("DETR is implemented with a ResNet backbone only")
        if self.num_feature_levels != 1 or self.with_box_refine or self.two_stage:
            raise ValueError("DETR uses one feature level (num_feature_levels=1), no box refinement, no two-stage")

    @classmethod
    def from_variant(cls, variant: str = "multi-scale", **overrides: Any) -> "ModelConfig":
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        return cls(**{**VARIANTS[variant], **overrides})

    @property
    def variant(self) -> str:
        if self.arch == "detr":
            return "detr-dc5" if self.dilation else "detr"
        if self.two_stage:
            return "two-stage"
        if self.with_box_refine:
            return "box-refine"
        if self.num_feature_levels == 1:
            return "single-scale-dc5" if self.dilation else "single-scale"
        return "multi-scale"

    @property
    def backbone_label(self) -> str:
        """For people: "ResNet-50", "ResNet-50 DC5", "vit-small (12 blocks)"."""
        if self.backbone == "resnet":
            return f"ResNet-{self.backbone_depth}{' DC5' if self.dilation else ''}"
        return f"{self.backbone} ({self.vit_depth or VIT_SIZES[self.backbone][1]} blocks)"

    @property
    def labels(self) -> LabelTable:
        """Label index -> category id and name, as every output file writes them."""
        return LabelTable.for_config(self)

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"variant"}
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in d.items() if k in known})

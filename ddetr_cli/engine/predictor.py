"""Image in, detections out: reading, resizing, normalising, batching, post-processing.

``Detector`` is the Python API under ``ddetr detect``, ``video`` and ``eval``::

    det = Detector.from_pretrained("demo")
    [dets] = det(["photo.jpg"], conf=0.3)        # supervision.Detections, xyxy in pixels
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import supervision as sv
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ddetr_cli.data.images import ImageLike, read_image
from ddetr_cli.data.transforms import preprocess, resize_shape
from ddetr_cli.engine.panoptic import PANOPTIC_THRESHOLD, merge_panoptic
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.panoptic import Panoptic
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.fusion import to_reduced_precision
from ddetr_cli.ops.cpu import bf16_support


def select_detections(
    logits: torch.Tensor,
    max_det: int = 100,
    classes: Sequence[int] | None = None,
    no_object: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores -> the ``max_det`` best (score, query, label) per image, best first, each (B, K).

    Deformable DETR (logits (B, Q, C), sigmoid): top-K over all Q*C scores, so a query may yield
    several labels; ``classes`` zeroes the other labels first. DETR (``no_object``, logits
    (B, Q, C+1), softmax): each query's best real class and its probability, as transformers'
    ``post_process_object_detection``; a query whose label is not in ``classes`` scores 0.
    """
    logits = logits.float()
    c = logits.shape[-1] - (1 if no_object else 0)
    keep = None
    if classes is not None:
        keep = torch.zeros(c, dtype=torch.bool, device=logits.device)
        keep[[k for k in classes if 0 <= k < c]] = True
    if no_object:
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        if keep is not None:
            scores = scores * keep[labels]
        scores, query = scores.topk(min(max_det, scores.shape[1]), dim=1)
        return scores, query, torch.gather(labels, 1, query)
    prob = logits.sigmoid()
    b, q, _ = prob.shape
    if keep is not None:
        prob = prob * keep
    scores, idx = prob.view(b, -1).topk(min(max_det, q * c), dim=1)
    return scores, idx // c, idx % c


def masks_to_image(masks: torch.Tensor, padded_hw: tuple[int, int], valid_hw: tuple[int, int],
                   size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """One image's mask logits -> bool masks in original pixels, as DETR's PostProcessSegm: bilinear
    to the padded input size, sigmoid > threshold, crop the resized image, nearest to the original.

    masks (K, h, w) logits over the padded input (Hp, Wp) = ``padded_hw``; ``valid_hw`` = the
    resized image inside the padding; ``size`` = original (H, W) -> (K, H, W) bool.
    """
    out = np.zeros((masks.shape[0], *size), dtype=bool)
    for start in range(0, masks.shape[0], 16):  # chunks: full-size float maps of 100 masks are ~0.4 GB
        chunk = masks[start : start + 16].float()[None]
        up = F.interpolate(chunk, size=tuple(padded_hw), mode="bilinear", align_corners=False)
        binary = (up.sigmoid() > threshold)[:, :, : valid_hw[0], : valid_hw[1]].float()
        out[start : start + 16] = (F.interpolate(binary, size=tuple(size), mode="nearest")[0] > 0.5).cpu().numpy()
    return out


def postprocess(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    conf: float = 0.3,
    max_det: int = 100,
    classes: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    *,
    no_object: bool = False,
    masks: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
) -> list[sv.Detections]:
    """Model outputs -> per-image detections in pixels of the original images.

    logits (B, Q, C) (or (B, Q, C+1) with ``no_object``: DETR), boxes (B, Q, 4) cxcywh
    normalised, sizes [(h, w)] of the original images; see :func:`select_detections` for the
    scoring, then the ``conf`` threshold. With ``masks`` (B, Q, h, w) logits (DETR's mask head)
    and ``pad_mask`` (B, Hp, Wp) True on padding (from :func:`preprocess`), ``Detections.mask``
    holds (N, H, W) bool masks in original pixels.
    """
    scores, query, labels = select_detections(logits, max_det, classes, no_object)
    cx, cy, w, h = boxes.float().unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    if masks is not None and pad_mask is None:
        raise ValueError("postprocess: masks need the pad_mask of the batch")
    out = []
    for i, (ih, iw) in enumerate(sizes):
        sel = torch.gather(xyxy[i], 0, query[i][:, None].expand(-1, 4))
        sel = sel * torch.tensor([iw, ih, iw, ih], dtype=sel.dtype, device=sel.device)
        sel[:, 0::2] = sel[:, 0::2].clamp(0, iw)
        sel[:, 1::2] = sel[:, 1::2].clamp(0, ih)
        ok = scores[i] > conf
        lab = labels[i][ok].cpu().numpy().astype(int)
        data: dict[str, Any] = {}
        if class_names is not None:
            names = [class_names[j] if j < len(class_names) and class_names[j] else str(j) for j in lab]
            data["class_name"] = np.array(names, dtype=object)
        seg = None
        if masks is not None:
            valid = ~pad_mask[i]
            valid_hw = (int(valid[:, 0].sum()), int(valid[0, :].sum()))
            seg = masks_to_image(masks[i][query[i][ok]], tuple(pad_mask.shape[-2:]), valid_hw, (ih, iw))
        out.append(
            sv.Detections(
                xyxy=sel[ok].cpu().numpy().astype(np.float32).reshape(-1, 4),
                mask=seg,
                confidence=scores[i][ok].cpu().numpy().astype(np.float32),
                class_id=lab,
                data=data,
            )
        )
    return out


def pick_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA GPU ``local_rank`` if CUDA exists, else CPU; otherwise 'cpu', 'cuda'/'gpu'
    (GPU ``local_rank``), 'cuda:N' or 'N'. Raises ValueError for an unusable request."""
    req = "auto" if device in (None, "") else str(device).strip().lower()
    if req == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if req in ("cuda", "gpu"):
        req = f"cuda:{local_rank}"
    elif req.isdigit():
        req = f"cuda:{req}"
    try:
        dev = torch.device(req)
    except RuntimeError:
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


# Default batching (``Detector.auto_batch``): the most input pixels per forward pass (CPU, CUDA)
AUTO_BATCH_PIXELS = (1_000_000, 8_000_000)
AUTO_BATCH_MAX = 8


class Detector:
    """A loaded model plus its pre/post-processing, batched."""

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = "auto",
        half: bool = False,
        imgsz: int | None = None,
        max_size: int | None = None,
        optimize: bool = True,
    ) -> None:
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        # optimize=False keeps the model trainable (training's validation predicts with it)
        if optimize and not model.inference_only:
            model.optimize_for_inference()
        self.half = half
        # CPU: bfloat16 weights where the CPU multiplies bfloat16 natively (CUDA: autocast)
        self.dtype = torch.float32
        if half and self.device.type == "cpu":
            ok, why = bf16_support()
            if not ok and os.environ.get("DDETR_CPU_BF16") != "force":
                raise ValueError(f"--half on CPU needs AMX or AVX512-BF16, and this CPU has {why}: bfloat16 would run "
                                 "slower than float32 here")
            if not model.inference_only:
                raise ValueError("--half on CPU is for inference (the model is kept trainable here)")
            to_reduced_precision(model, torch.bfloat16, list(model.FLOAT32_HEADS))
            self.dtype = torch.bfloat16
        elif half and self.device.type != "cuda":
            raise ValueError(f"--half needs a CUDA device or a CPU, not {self.device.type}")
        self.imgsz = imgsz or model.cfg.imgsz
        # the reference 800/1333 pair, scaled with the requested short side
        self.max_size = max_size if max_size is not None else int(round(self.imgsz * 1333 / 800))

    def input_shape(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) of an image -> the (h, w) the model sees it at (before any padding)."""
        return resize_shape(h, w, self.imgsz, self.max_size)

    def auto_batch(self, shape: tuple[int, int]) -> int:
        """How many images of one input ``shape`` (h, w) to run per forward pass by default.

        Batching images of one shape needs no padding, so each image's detections stay those of
        a forward pass on its own; it pays where per-layer overhead is a large share of the time
        (small inputs, and CPUs whose threads are shared). The pixel budget bounds the activation
        memory: on CPU a COCO-sized 800x1066 input runs alone, the demo's 256x341 eight at a time."""
        budget = AUTO_BATCH_PIXELS[self.device.type == "cuda"]
        return max(1, min(AUTO_BATCH_MAX, budget // (shape[0] * shape[1])))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None, **kw: Any) -> "Detector":
        from ddetr_cli.weights.load import load_model
        from ddetr_cli.weights.store import resolve

        return cls(load_model(resolve(name_or_path)), **kw)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @functools.cached_property
    def labels(self) -> LabelTable:
        """Label index -> category id and name (``labels.LabelTable``), as every output writes them."""
        return self.cfg.labels

    @property
    def class_names(self) -> list[str]:
        """Per label index, its name for display (an unnamed slot shows its index)."""
        return [self.labels.name(i) for i in range(self.cfg.num_classes)]

    def _autocast(self):
        if self.half and self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def forward_arrays(self, images: Sequence[np.ndarray]) -> dict:
        """RGB uint8 arrays -> raw model outputs (``logits``, ``boxes``) of one batch."""
        return self._forward(images)[0]

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB uint8 arrays -> (pixels (B, 3, Hp, Wp) normalised, in the model's input dtype, on its
        device; padding mask (B, Hp, Wp) True on padding)."""
        pixels, mask = preprocess(images, self.imgsz, self.max_size, self.device)
        return pixels.to(self.dtype), mask

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor, mask: torch.Tensor) -> dict:
        """The model on a preprocessed batch (under autocast with ``half`` on CUDA) -> raw outputs."""
        with self._autocast():
            return self.model(pixels, mask)

    @torch.inference_mode()
    def _forward(self, images: Sequence[np.ndarray]) -> tuple[dict, torch.Tensor]:
        """-> (raw outputs, padding mask (B, Hp, Wp) of the batch)."""
        pixels, mask = self.preprocess(images)
        return self.infer(pixels, mask), mask

    def decode(
        self,
        out: dict,
        pad_mask: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        conf: float = 0.3,
        max_det: int = 100,
        classes: Sequence[int] | None = None,
    ) -> list[sv.Detections]:
        """Raw outputs of one batch (and its padding mask) -> detections per image, scored the
        way the model family is (DETR: softmax with "no object"), with masks when it has a mask head.
        Unnamed slots of the label table (COCO's "N/A" ids) are never detected."""
        if classes is None and self.labels.has_unnamed:
            classes = self.labels.labels
        return postprocess(out["logits"], out["boxes"], sizes, conf, max_det, classes, self.class_names,
                           no_object=self.cfg.arch == "detr", masks=out.get("masks"), pad_mask=pad_mask)

    def decode_panoptic(
        self,
        out: dict,
        pad_mask: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        threshold: float = PANOPTIC_THRESHOLD,
        classes: Sequence[int] | None = None,
        stuff_labels: Sequence[int] | None = None,
    ) -> list[Panoptic]:
        """Raw outputs of one batch of a mask-head model (and its padding mask) -> one panoptic
        segmentation per image (``engine.panoptic.merge_panoptic``) of the given (H, W) ``sizes``;
        stuff classes from the label table unless ``stuff_labels`` are given; unnamed slots
        never form segments."""
        if "masks" not in out:
            raise ValueError("panoptic segmentation needs a model with a mask head")
        if classes is None and self.labels.has_unnamed:
            classes = self.labels.labels
        stuff = self.labels.stuff_labels if stuff_labels is None else stuff_labels
        res = []
        for i, size in enumerate(sizes):
            valid = ~pad_mask[i]
            valid_hw = (int(valid[:, 0].sum()), int(valid[0, :].sum()))
            res.append(merge_panoptic(out["logits"][i], out["masks"][i], tuple(size), stuff,
                                      padded_hw=tuple(pad_mask.shape[-2:]), valid_hw=valid_hw,
                                      threshold=threshold, classes=classes, no_object=self.cfg.arch == "detr"))
        return res

    def panoptic_arrays(
        self,
        images: Sequence[np.ndarray],
        threshold: float = PANOPTIC_THRESHOLD,
        classes: Sequence[int] | None = None,
        stuff_labels: Sequence[int] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Panoptic]:
        """One batch of RGB uint8 arrays -> a panoptic segmentation per image, at ``sizes``
        (default: the images' own)."""
        out, pad_mask = self._forward(images)
        sizes = sizes or [im.shape[:2] for im in images]
        return self.decode_panoptic(out, pad_mask, sizes, threshold, classes, stuff_labels)

    def predict_panoptic(
        self,
        images: Sequence[np.ndarray],
        conf: float = 0.3,
        max_det: int = 100,
        classes: Sequence[int] | None = None,
        threshold: float = PANOPTIC_THRESHOLD,
    ) -> tuple[list[sv.Detections], list[Panoptic]]:
        """One batch of RGB uint8 arrays -> (detections, panoptic segmentations) per image, from
        one forward pass. ``threshold`` keeps queries for the segment map; ``conf`` the detections."""
        out, pad_mask = self._forward(images)
        sizes = [im.shape[:2] for im in images]
        return (self.decode(out, pad_mask, sizes, conf, max_det, classes),
                self.decode_panoptic(out, pad_mask, sizes, threshold, classes))

    def predict_arrays(
        self,
        images: Sequence[np.ndarray],
        conf: float = 0.3,
        max_det: int = 100,
        classes: Sequence[int] | None = None,
    ) -> list[sv.Detections]:
        """One batch of RGB uint8 arrays -> detections per image."""
        out, pad_mask = self._forward(images)
        return self.decode(out, pad_mask, [im.shape[:2] for im in images], conf, max_det, classes)

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        conf: float = 0.3,
        max_det: int = 100,
        classes: Sequence[int] | None = None,
        batch_size: int = 1,
    ) -> list[sv.Detections]:
        if isinstance(images, (str, Path, np.ndarray, Image.Image)):
            images = [images]
        arrays = [read_image(im) for im in images]
        out: list[sv.Detections] = []
        for i in range(0, len(arrays), max(1, batch_size)):
            out += self.predict_arrays(arrays[i : i + batch_size], conf, max_det, classes)
        return out

    def class_ids(self, names_or_ids: Sequence[str | int]) -> list[int]:
        """Class names (case-insensitive) or category ids (as the output files write them) -> the
        model's label indices; unknown names or ids raise ValueError."""
        by_id = {c.id: c for c in self.labels}
        ids = []
        for item in names_or_ids:
            s = str(item).strip()
            cat = by_id.get(int(s)) if s.isdigit() else self.labels.find(s)
            if cat is None:
                raise ValueError(f"unknown class {s!r}; the model knows: "
                                 + ", ".join(f"{c.name} ({c.id})" for c in self.labels))
            ids.append(cat.label)
        return ids

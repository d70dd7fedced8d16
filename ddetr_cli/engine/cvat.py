"""A CVAT auto-annotation function: the model inside CVAT, through ``cvat-cli``.

A module that ``cvat-cli`` loads by name (``--function-module ddetr_cli.engine.cvat``) and turns
into a detection function of ``cvat_sdk.auto_annotation`` by calling :func:`create` with the
``-p NAME=TYPE:VALUE`` parameters::

    cvat-cli task auto-annotate TASK_ID --function-module ddetr_cli.engine.cvat -p model=str:demo
    cvat-cli function create-native "ddetr demo" --function-module ddetr_cli.engine.cvat -p model=str:demo
    cvat-cli function run-agent FUNCTION_ID --function-module ddetr_cli.engine.cvat -p model=str:demo

The function's ``spec`` declares one label per model category (id = the category id that every
ddetr output uses, name = its name; type ``rectangle``, or ``polygon`` with ``masks``); CVAT
matches them to the task's labels by name. ``detect`` returns a rectangle per detection (pixels,
``[x1, y1, x2, y2]``, with its ``score``), or with ``masks`` a polygon of the detection's mask
(parts joined into one ring, as ``formats.masks`` writes them for every tool; a detection whose
mask is empty is left out), keeping those whose score is at least the context's confidence
threshold (``--conf-threshold``), or ``conf`` when CVAT gives none.
"""

from __future__ import annotations

from collections.abc import Sequence

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image
from cvat_sdk import models

from ddetr_cli.data.images import read_image
from ddetr_cli.engine.predictor import Detector
from ddetr_cli.formats.masks import instance_polygons, join_polygons, require_masks


class DdetrDetectionFunction:
    """``cvat_sdk.auto_annotation.DetectionFunction`` over a :class:`Detector`."""

    def __init__(self, detector: Detector, *, conf: float = 0.3, masks: bool = False, max_det: int = 100,
                 classes: Sequence[int] | None = None) -> None:
        if masks:
            require_masks(detector)
        self.detector = detector
        self.conf, self.masks, self.max_det, self.classes = conf, masks, max_det, classes
        kind = "polygon" if masks else "rectangle"
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(c.name, c.id, type=kind) for c in detector.labels
                    if classes is None or c.label in classes])

    def detect(self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image) -> list[models.LabeledShapeRequest]:
        """One image (CVAT hands a PIL image) -> shapes with the spec's label ids, frame 0."""
        threshold = self.conf if context.conf_threshold is None else float(context.conf_threshold)
        # the detector keeps scores above its threshold; CVAT asks for scores at or above
        [dets] = self.detector.predict_arrays([read_image(image)], max(0.0, np.nextafter(threshold, -1.0)), self.max_det,
                                              self.classes)
        dets = dets[dets.confidence >= threshold]
        polygons = instance_polygons(dets) if self.masks else None
        shapes = []
        for i, (box, label, score) in enumerate(zip(dets.xyxy, dets.class_id, dets.confidence)):
            cat = self.detector.labels.get(int(label))
            if cat is None:
                continue
            if polygons is None:
                shapes.append(cvataa.rectangle(cat.id, [float(v) for v in box], score=float(score)))
                continue
            ring = join_polygons(polygons[i])
            if len(ring) >= 6:
                shapes.append(cvataa.polygon(cat.id, [float(v) for v in ring], score=float(score)))
        return shapes


def create(model: str | None = None, device: str = "auto", conf: float = 0.3, masks: bool = False, max_det: int = 100,
           classes: str | None = None, imgsz: int | None = None) -> DdetrDetectionFunction:
    """The function for ``cvat-cli``'s ``-p`` parameters: ``model=str:NAME`` (a registry name or
    weights path, as ``--model``; default: the COCO model), ``device=str:cuda``,
    ``conf=float:0.5`` (when CVAT passes no threshold), ``masks=bool:true``, ``max_det=int:100``,
    ``classes=str:circle,square`` (names or category ids), ``imgsz=int:800``."""
    det = Detector.from_pretrained(model, device=device, imgsz=imgsz)
    ids = det.class_ids([c for c in classes.split(",") if c.strip()]) if classes else None
    return DdetrDetectionFunction(det, conf=conf, masks=masks, max_det=max_det, classes=ids)

"""The CVAT auto-annotation function (``ddetr_cli.engine.cvat``), loaded and checked by CVAT's
own code: ``cvat-cli``'s function loader with its ``-p NAME=TYPE:VALUE`` parser (what ``cvat-cli
task auto-annotate --function-module ... -p model=str:demo`` and the agent run), the agent's
spec serialisation (``function create-native``), and ``cvat_sdk``'s annotation mapper, which
validates every shape and maps its label to a task's label by name, as ``annotate_task`` does
before uploading. The shapes are checked against the Detector's own detections of the image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image
import pytest
from cvat_cli._internal.agent import get_function_driver_class
from cvat_cli._internal.common import FunctionLoader
from cvat_cli._internal.parsers import parse_function_parameter
from cvat_sdk import models
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl
from pycocotools import mask as mask_utils

from ddetr_cli.data.images import read_image
from ddetr_cli.engine.predictor import Detector

ROOT = Path(__file__).resolve().parents[2]
IMAGES = sorted((ROOT / "examples" / "images").glob("*.jpg"))
NAMES = ["circle", "square", "triangle", "cross", "ring"]
MODULE = "ddetr_cli.engine.cvat"


def load(*params: str):
    """The function as cvat-cli builds it from ``--function-module MODULE -p ...``."""
    return FunctionLoader(MODULE, None, dict(parse_function_parameter(p) for p in params)).load()


def task_labels(names, kind="any", first_id=101) -> list[models.Label]:
    """A CVAT task's labels (ids of the task's own)."""
    return [models.Label(id=first_id + i, name=n, type=kind, attributes=[], sublabels=[]) for i, n in enumerate(names)]


def run(fn, image: Path, labels, threshold=None, allow_unmatched=False, to_poly=False, frame=7):
    """detect() on one frame, then cvat_sdk's validation and label mapping -> the shapes CVAT
    would upload."""
    shapes = fn.detect(_DetectionFunctionContextImpl(frame_name=image.name, conf_threshold=threshold,
                                                     conv_mask_to_poly=to_poly), PIL.Image.open(image))
    mapper = _AnnotationMapper(logging.getLogger("cvat-test"), fn.spec.labels, labels,
                               allow_unmatched_labels=allow_unmatched, conv_mask_to_poly=to_poly)
    tags, mapped = mapper.validate_and_remap(shapes, frame)
    assert tags == []
    return mapped


@pytest.fixture(scope="module")
def fn():
    return load("model=str:demo", "device=str:cpu", "conf=float:0.5")


@pytest.fixture(scope="module")
def demo() -> Detector:
    return Detector.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def reference(demo) -> dict:
    """The Detector's every detection (scores > 0) of the first two images, by path."""
    return {image: demo.predict_arrays([read_image(image)], 0.0)[0] for image in IMAGES[:2]}


def test_spec_and_agent_registration(fn, demo):
    assert isinstance(fn.spec, cvataa.DetectionFunctionSpec)
    assert [(lab.name, lab.id, lab.type) for lab in fn.spec.labels] == [(c.name, c.id, "rectangle") for c in demo.labels]
    assert [lab.name for lab in fn.spec.labels] == NAMES
    # what `cvat-cli function create-native` sends to the server for an agent
    driver = get_function_driver_class(fn.spec)
    assert driver.FUNCTION_KIND == "detector"
    fields = driver.get_remote_function_fields(fn.spec)
    assert [(lab["name"], lab["type"]) for lab in fields["labels_v2"]] == [(n, "rectangle") for n in NAMES]
    # the classes parameter narrows the spec
    narrow = load("model=str:demo", "device=str:cpu", "classes=str:square,ring")
    assert [lab.name for lab in narrow.spec.labels] == ["square", "ring"]
    with pytest.raises(TypeError):  # an unknown parameter, as cvat-cli reports it
        load("model=str:demo", "colour=str:red")


@pytest.mark.parametrize("threshold", [None, 0.0, 0.75])
def test_rectangles_threshold_and_label_ids(fn, reference, threshold):
    """Shapes are rectangles in pixels with the task's label ids; exactly the Detector's
    detections with a score at or above the context's threshold (or the function's conf)."""
    labels = task_labels(NAMES[::-1] + ["dog"], kind="rectangle")
    ids = {lab.name: lab.id for lab in labels}
    total = 0
    for image, d in reference.items():
        shapes = run(fn, image, labels, threshold)
        want = d[d.confidence >= (0.5 if threshold is None else threshold)]
        assert len(shapes) == len(want)
        for s, box, c, score in zip(shapes, want.xyxy, want.class_id, want.confidence):
            assert s.type.value == "rectangle" and s.frame == 7 and s.source == "auto"
            assert s.label_id == ids[NAMES[c]]
            assert s.points == pytest.approx(box.tolist(), abs=1e-3)
            assert s.score == pytest.approx(float(score), abs=1e-6)
            assert s.score >= (0.5 if threshold is None else threshold)
        total += len(shapes)
    assert total > 0


def test_task_with_some_of_the_labels(fn, reference):
    labels = task_labels(["square", "circle"])
    with pytest.raises(cvataa.BadFunctionError, match="not in dataset"):
        run(fn, IMAGES[1], labels)  # cvat-cli without --allow-unmatched-labels
    shapes = run(fn, IMAGES[1], labels, allow_unmatched=True)
    d = reference[IMAGES[1]]
    assert {s.label_id for s in shapes} <= {101, 102}
    assert len(shapes) == int(((d.confidence >= 0.5) & np.isin(d.class_id, [0, 1])).sum()) > 0
    # a task whose labels are polygons does not take rectangles
    with pytest.raises(cvataa.BadFunctionError, match="type"):
        run(fn, IMAGES[1], task_labels(NAMES, kind="polygon"))


def test_masks_polygons(tiny_mask_model_path):
    fn = load(f"model=str:{tiny_mask_model_path}", "device=str:cpu", "masks=bool:true", "imgsz=int:96", "conf=float:0.05")
    assert {lab.type for lab in fn.spec.labels} == {"polygon"}
    det = Detector.from_pretrained(str(tiny_mask_model_path), device="cpu", imgsz=96)
    labels = task_labels(NAMES, kind="polygon")
    n = 0
    for image in IMAGES[:2]:
        img = read_image(image)
        h, w = img.shape[:2]
        shapes = run(fn, image, labels, to_poly=True)
        assert shapes == run(fn, image, labels, to_poly=False)  # polygons either way, never masks
        [d] = det.predict_arrays([img], 0.05)
        want = [(m, c) for m, c in zip(d.mask, d.class_id) if m.any()]
        assert len(shapes) == len(want)
        for s, (m, c) in zip(shapes, want):
            assert s.type.value == "polygon" and s.label_id == 101 + int(c) and len(s.points) >= 6
            got = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([list(s.points)], h, w))).astype(bool)
            assert (got & m).sum() / (got | m).sum() >= 0.9
            n += 1
    assert n > 0
    with pytest.raises(cvataa.BadFunctionError, match="type"):
        run(fn, IMAGES[0], task_labels(NAMES, kind="rectangle"))


def test_masks_need_a_mask_model():
    from ddetr_cli.formats.masks import MasksUnavailable

    with pytest.raises(MasksUnavailable, match="mask head"):
        load("model=str:demo", "masks=bool:true")


def test_image_modes(fn):
    """CVAT hands PIL images of any mode (grayscale, RGBA): each is read as RGB."""
    img = PIL.Image.open(IMAGES[1])
    ctx = _DetectionFunctionContextImpl(frame_name="x", conf_threshold=0.5)
    base = fn.detect(ctx, img.convert("RGB"))
    assert base and all(isinstance(s, models.LabeledShapeRequest) for s in fn.detect(ctx, img.convert("L")))
    rgba = fn.detect(ctx, img.convert("RGBA"))
    assert np.array(rgba[0].points) == pytest.approx(np.array(base[0].points), abs=1e-3)

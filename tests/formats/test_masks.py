"""Instance masks: polygons checked by pycocotools (the reader CVAT and COCOeval use), detect and
video outputs from a stub detector with known masks, the --masks error, mask AP against COCOeval."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import supervision as sv
from coco_reference import cocoeval_stats
from pycocotools.coco import COCO

from ddetr_cli.data import synth
from ddetr_cli.data.datasets import load_dataset
from ddetr_cli.engine.detect import run_detect
from ddetr_cli.engine.evaluator import METRIC_NAMES, evaluate
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.formats.masks import MasksUnavailable, join_polygons, mask_to_polygons

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' numpy-2 notice

NAMES = ["circle", "square", "triangle", "cross", "ring"]


# -- shapes with known pixels -------------------------------------------------------------------


def _blank(h: int = 120, w: int = 160) -> np.ndarray:
    return np.zeros((h, w), np.uint8)


def _shapes(h: int = 120, w: int = 160) -> dict[str, np.ndarray]:
    """Masks drawn with OpenCV: holes, several parts, thin, tiny, on the border."""
    out = {}
    m = _blank(h, w)
    cv2.circle(m, (60, 60), 35, 1, -1)
    out["disc"] = m
    m = _blank(h, w)
    cv2.ellipse(m, (80, 60), (50, 35), 30, 0, 360, 1, thickness=12)
    out["ring_hole"] = m
    m = _blank(h, w)
    cv2.circle(m, (30, 30), 18, 1, -1)
    cv2.rectangle(m, (100, 70), (150, 110), 1, -1)
    out["two_parts"] = m
    m = _blank(h, w)
    m[20:100, 20:100] = 1
    m[30:50, 30:50] = 0
    m[60:95, 60:95] = 0
    m[70:80, 70:80] = 1  # an island inside a hole
    out["holes_and_island"] = m
    m = _blank(h, w)
    cv2.line(m, (5, 110), (150, 8), 1, 1)
    out["thin_line"] = m
    m = _blank(h, w)
    m[40:43, 50:53] = 1
    out["tiny_3x3"] = m
    m = _blank(h, w)
    m[7, 9] = 1
    out["one_pixel"] = m
    m = _blank(h, w)
    cv2.circle(m, (0, h - 1), 40, 1, -1)
    m[:, w - 12 :] = 1
    m[0:5, :] = 1
    out["touching_border"] = m
    m = _blank(h, w)
    m[10, 10] = m[11, 11] = m[12, 12] = 1  # diagonal neighbours only
    out["diagonal_pixels"] = m
    rng = np.random.default_rng(0)
    out["blobs"] = (cv2.GaussianBlur(rng.random((h, w)), (0, 0), 3) > 0.5).astype(np.uint8)
    return {k: v.astype(bool) for k, v in out.items()}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


def _ann_to_mask(segmentation: list, h: int, w: int) -> np.ndarray:
    """pycocotools' own path: a COCO dataset with one annotation, then ``annToMask``."""
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": w, "height": h}], "categories": [{"id": 1, "name": "x"}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": segmentation,
                                     "area": 1.0, "bbox": [0, 0, 1, 1], "iscrowd": 0}]}
    coco.createIndex()
    return coco.annToMask(coco.anns[1]).astype(bool)


def _check_polygons(polygons: list, h: int, w: int) -> None:
    assert isinstance(polygons, list) and polygons
    for p in polygons:
        assert isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
        assert all(isinstance(v, float) for v in p)
        xs, ys = np.array(p[0::2]), np.array(p[1::2])
        assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= w and ys.max() <= h


@pytest.mark.parametrize("name", list(_shapes()))
def test_polygons_round_trip_through_pycocotools(name: str) -> None:
    mask = _shapes()[name]
    h, w = mask.shape
    polygons = mask_to_polygons(mask)
    _check_polygons(polygons, h, w)
    assert _iou(_ann_to_mask(polygons, h, w), mask) >= 0.95
    # unsimplified, the traced pixel edges give back exactly the mask
    exact = mask_to_polygons(mask, simplify=0)
    _check_polygons(exact, h, w)
    assert np.array_equal(_ann_to_mask(exact, h, w), mask)
    # one ring per instance (YOLO segmentation) covers the same pixels
    assert _iou(_ann_to_mask([join_polygons(polygons)], h, w), mask) >= 0.95


def test_parts_holes_and_simplification() -> None:
    s = _shapes()
    assert len(mask_to_polygons(s["two_parts"])) == 2
    assert len(mask_to_polygons(s["ring_hole"])) == 1  # the hole is joined in, not filled
    filled = _blank().astype(bool)
    filled[_ann_to_mask(mask_to_polygons(s["ring_hole"]), 120, 160)] = True
    assert not filled[60, 80]  # the ring's centre stays empty
    # a large smooth outline keeps far fewer vertices than its pixel staircase
    disc = s["disc"]
    assert len(mask_to_polygons(disc)[0]) * 4 < len(mask_to_polygons(disc, simplify=0)[0])
    assert mask_to_polygons(_blank().astype(bool)) == []


# -- a detector with known masks ------------------------------------------------------------------


class MaskStub:
    """Stands in for a ``Detector`` with a mask head: per image size, fixed boxes and masks."""

    def __init__(self, answers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]], masks: bool = True) -> None:
        self.labels = LabelTable.from_names(NAMES)
        self.cfg = SimpleNamespace(masks=masks, variant="stub", class_names=NAMES, num_classes=len(NAMES))
        self.answers = answers
        self.with_masks = masks

    def predict_arrays(self, images, conf=0.3, max_det=100, classes=None):
        out = []
        for im in images:
            labels, masks = self.answers[im.shape[:2]]
            boxes = np.array([_tight_box(m) if m.any() else [5, 5, 25, 25] for m in masks], np.float32).reshape(-1, 4)
            out.append(sv.Detections(xyxy=boxes, confidence=np.linspace(0.9, 0.5, len(boxes)).astype(np.float32),
                                     class_id=np.asarray(labels, int),
                                     mask=masks.astype(bool) if self.with_masks else None))
        return out


def _tight_box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _scene(h: int, w: int, names: list[str], with_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    s = _shapes(h, w)
    masks = [s[n] for n in names] + ([np.zeros((h, w), bool)] if with_empty else [])
    return np.arange(len(masks)) % len(NAMES), np.stack(masks)


@pytest.fixture()
def masked_images(tmp_path: Path) -> tuple[Path, dict]:
    """Three PNGs of different sizes and the stub's answer for each."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    answers = {
        (120, 160): _scene(120, 160, ["disc", "tiny_3x3"], with_empty=True),
        (121, 160): _scene(121, 160, ["ring_hole", "touching_border", "thin_line"]),
        (120, 161): _scene(120, 161, ["two_parts", "holes_and_island", "one_pixel", "diagonal_pixels"]),
    }
    for i, (h, w) in enumerate(answers):
        img = (rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
        cv2.imwrite(str(folder / f"img{i}.png"), img)
    return folder, answers


def test_detect_writes_polygons_that_pycocotools_reads(masked_images, tmp_path: Path) -> None:
    folder, answers = masked_images
    out = tmp_path / "run"
    res = run_detect(MaskStub(answers), [str(folder)], out, masks=True, formats=("coco", "yolo", "voc"), workers=1)
    assert res.images == 3
    coco = COCO(str(out / "predictions.json"))
    assert coco.dataset["info"]["masks"] is True
    checked = empty = 0
    for img in coco.dataset["images"]:
        h, w = img["height"], img["width"]
        labels, masks = answers[(h, w)]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) == len(masks)
        for a, m in zip(sorted(anns, key=lambda a: a["id"]), masks):
            if not m.any():  # an empty mask keeps its box, without a segmentation
                assert a["segmentation"] == [] and a["bbox"] == [5.0, 5.0, 20.0, 20.0]
                empty += 1
                continue
            _check_polygons(a["segmentation"], h, w)
            assert _iou(coco.annToMask(a), m) >= 0.95
            assert a["area"] == m.sum()
            assert a["bbox"] == pytest.approx([*_tight_box(m)[:2], _tight_box(m)[2] - _tight_box(m)[0],
                                               _tight_box(m)[3] - _tight_box(m)[1]])
            checked += 1
        # YOLO segmentation: one normalised ring per line, read back through the dataset loader too
        lines = (out / "labels" / (Path(img["file_name"]).stem + ".txt")).read_text().splitlines()
        assert len(lines) == len(masks)
        for line, label, m in zip(lines, labels, masks):
            v = [float(x) for x in line.split()]
            assert int(v[0]) == label and len(v) >= 7 and len(v) % 2 == 1
            ring = [x * (w if k % 2 == 0 else h) for k, x in enumerate(v[1:])]
            if m.any():
                assert _iou(_ann_to_mask([ring], h, w), m) >= 0.95
    assert checked == 9 and empty == 1
    xml = (out / "voc" / "Annotations" / "img0.xml").read_text()
    assert "<bndbox>" in xml and "polygon" not in xml


def test_yolo_segmentation_output_loads_as_a_masked_dataset(masked_images, tmp_path: Path) -> None:
    folder, answers = masked_images
    out = tmp_path / "run"
    run_detect(MaskStub(answers), [str(folder)], out, masks=True, formats=("yolo",), save_images=False, workers=1)
    ds_root = tmp_path / "yolo_ds"
    (ds_root / "images" / "val").mkdir(parents=True)
    (ds_root / "labels").mkdir()
    for p in folder.iterdir():
        (ds_root / "images" / "val" / p.name).write_bytes(p.read_bytes())
    (out / "labels").rename(ds_root / "labels" / "val")
    (ds_root / "data.yaml").write_text("val: images/val\nnames: [" + ", ".join(NAMES) + "]\n")
    ds = load_dataset(ds_root, "val")
    for r in ds.records:
        labels, masks = answers[(r.height, r.width)]
        decoded = r.masks()
        assert r.has_masks and decoded.shape == masks.shape
        for got, want in zip(decoded, masks):
            if want.any():
                assert _iou(got, want) >= 0.95


def test_annotated_images_show_masks(masked_images, tmp_path: Path) -> None:
    folder, answers = masked_images
    src = cv2.imread(str(folder / "img0.png"))
    inside = (slice(55, 66), slice(55, 66))  # the disc's centre, away from box lines and labels
    outside = (slice(100, 118), slice(100, 150))  # no box, no mask
    drawn = {}
    for with_masks in (True, False):
        out = tmp_path / f"run_{with_masks}"
        run_detect(MaskStub(answers, masks=with_masks), [str(folder)], out, workers=1)
        drawn[with_masks] = cv2.imread(str(out / "annotated" / "img0.png"))
    changed = np.abs(drawn[True].astype(int) - src.astype(int)).sum(-1) > 30
    assert changed[inside].mean() > 0.95  # filled, translucent
    assert not changed[outside].any()
    assert np.array_equal(drawn[False][inside], src[inside])  # without masks nothing is filled there


def test_masks_without_a_mask_head_is_one_line(tiny_model_path: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from ddetr_cli.cli.main import main
    from ddetr_cli.engine.predictor import Detector

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 128, np.uint8))
    monkeypatch.chdir(tmp_path)
    for argv in (["detect", str(img), "--masks", "--out", str(tmp_path / "out")],
                 ["detect", str(img), "--masks"],
                 ["detect", str(img), "--panoptic", "--out", str(tmp_path / "out")],
                 ["video", str(synth_clip(tmp_path)), "--masks", "--out", str(tmp_path / "vout")]):
        monkeypatch.setattr(sys, "argv", ["ddetr", *argv, "--model", str(tiny_model_path)])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err.strip()
        assert e.value.code != 0
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert "mask head" in err and "detr-resnet-50-panoptic" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "vout").exists() and not (tmp_path / "runs").exists()
    # the API says the same, before writing anything
    with pytest.raises(MasksUnavailable):
        run_detect(Detector.from_pretrained(tiny_model_path), [str(img)], tmp_path / "api", masks=True)
    assert not (tmp_path / "api").exists()


def synth_clip(tmp_path: Path) -> Path:
    path = tmp_path / "clip.mp4"
    if not path.exists():
        synth.make_clip(path, frames=8, size=(160, 120), fps=8, seed=0)
    return path


# -- video ----------------------------------------------------------------------------------------


def test_video_draws_masks_and_writes_polygons(tmp_path: Path) -> None:
    from ddetr_cli.engine.video import run_video

    clip = synth_clip(tmp_path)
    answers = {(120, 160): _scene(120, 160, ["disc", "ring_hole"])}
    frames = []
    res = run_video(MaskStub(answers), clip, tmp_path / "run", save_json=True, masks=True, track=True,
                    on_frame=frames.append, handle_signals=False)
    assert res.frames == 8
    recs = [json.loads(x) for x in Path(res.outputs["jsonl"]).read_text().splitlines()]
    assert len(recs) == 8
    _, masks = answers[(120, 160)]
    for rec in recs:
        got = sorted(rec["detections"], key=lambda d: -d["score"])  # the stub's scores fall with its order
        assert len(got) == 2
        for d, m in zip(got, masks):
            _check_polygons(d["segmentation"], 120, 160)
            assert _iou(_ann_to_mask(d["segmentation"], 120, 160), m) >= 0.95
    for fr in frames:  # masks are drawn, with or without confirmed track ids
        changed = np.abs(fr.annotated.astype(int) - fr.frame.image.astype(int)).sum(-1) > 30
        assert changed[55:66, 55:66].mean() > 0.95
    # without --masks the lines stay boxes only
    res = run_video(MaskStub(answers), clip, tmp_path / "run2", save_json=True, handle_signals=False)
    recs = [json.loads(x) for x in Path(res.outputs["jsonl"]).read_text().splitlines()]
    assert all("segmentation" not in d for r in recs for d in r["detections"])


# -- mask AP ----------------------------------------------------------------------------------------


class GroundTruthMasks:
    """Answers each image of a COCO dataset with its ground-truth masks (decoded by pycocotools),
    optionally altered: masks shifted by ``shift`` pixels, random scores and one false positive."""

    def __init__(self, gt_file: Path, shift: int = 0) -> None:
        self.coco = COCO(str(gt_file))
        self.labels = LabelTable.from_names(NAMES)
        self.cfg = SimpleNamespace(masks=True, class_names=NAMES, num_classes=len(NAMES))
        self.shift = shift
        self.rng = np.random.default_rng(0)
        self.queue: list[int] = []

    def predict_arrays(self, images, conf=0.0, max_det=100, classes=None):
        out = []
        for im in images:
            img_id = self.queue.pop(0)
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[img_id]))
            masks = np.stack([self.coco.annToMask(a).astype(bool) for a in anns])
            boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], np.float32)
            labels = np.array([a["category_id"] - 1 for a in anns])
            scores = np.ones(len(anns), np.float32)
            if self.shift:
                masks = np.roll(masks, self.shift, axis=2)
                scores = self.rng.uniform(0.2, 1.0, len(anns)).astype(np.float32)
                fp = np.zeros_like(masks[:1])
                fp[:, 5:25, 5:25] = True
                masks = np.concatenate([masks, fp])
                boxes = np.concatenate([boxes, [[5, 5, 25, 25]]]).astype(np.float32)
                labels = np.concatenate([labels, [0]])
                scores = np.concatenate([scores, [0.95]]).astype(np.float32)
            out.append(sv.Detections(xyxy=boxes, confidence=scores, class_id=labels, mask=masks))
        return out


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("masked")
    synth.generate(root, n_train=1, n_val=6, size=(160, 120), seed=4, formats=("coco",))
    return root / "coco"


@pytest.mark.parametrize("shift", [0, 3])
def test_mask_ap_equals_cocoeval_on_the_written_files(masked_dataset: Path, tmp_path: Path, shift: int) -> None:
    ds = load_dataset(masked_dataset, "val")
    gt_file = masked_dataset / "valid" / "_annotations.coco.json"
    stub = GroundTruthMasks(gt_file, shift=shift)
    stub.queue = [int(r.image_id) for r in ds.records]
    res = evaluate(stub, ds, out_dir=tmp_path, save_predictions=True, workers=1)
    assert res.mask_metrics is not None
    stats = cocoeval_stats(gt_file, tmp_path / "predictions.json", "segm")
    for name, s in zip(METRIC_NAMES, stats):
        assert res.mask_metrics[name] == (None if s < 0 else pytest.approx(s, abs=1e-12)), name
    if shift == 0:
        assert res.mask_metrics["AP"] == pytest.approx(1.0, abs=0.02) and res.metrics["AP"] == pytest.approx(1.0)
    else:
        assert 0.05 < res.mask_metrics["AP"] < 0.95  # the perturbation must matter
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mask_metrics"]["AP"] == res.mask_metrics["AP"]
    assert {"mask_AP", "mask_AP50", "mask_AP75"} <= set(saved["per_class"][0])


def test_no_mask_ap_without_masks(masked_dataset: Path, tmp_path: Path) -> None:
    ds = load_dataset(masked_dataset, "val")
    stub = GroundTruthMasks(masked_dataset / "valid" / "_annotations.coco.json")
    stub.queue = [int(r.image_id) for r in ds.records]
    stub.cfg.masks = False
    real = stub.predict_arrays

    def boxes_only(images, **kw):
        dets = real(images, **kw)
        for d in dets:
            d.mask = None
        return dets

    stub.predict_arrays = boxes_only
    res = evaluate(stub, ds, workers=1)
    assert res.mask_metrics is None and res.to_dict()["mask_metrics"] is None
    assert res.metrics["AP"] == pytest.approx(1.0)


def test_partly_masked_ground_truth_gives_no_mask_ap(masked_dataset: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(masked_dataset, root)
    gt_file = root / "valid" / "_annotations.coco.json"
    data = json.loads(gt_file.read_text())
    data["annotations"][0]["segmentation"] = [[1.0, 2.0]]  # malformed: read as no mask
    gt_file.write_text(json.dumps(data))
    ds = load_dataset(root, "val")
    assert ds.records[0].segments[0] == [] and ds.records[0].has_masks == (len(ds.records[0].boxes) > 1)
    stub = GroundTruthMasks(masked_dataset / "valid" / "_annotations.coco.json")
    stub.queue = [int(r.image_id) for r in ds.records]
    res = evaluate(stub, ds, workers=1)
    assert res.mask_metrics is None and any("no segmentation" in w for w in res.warnings)
    assert res.metrics["AP"] == pytest.approx(1.0)


def test_eval_cli_table_and_json_show_both(masked_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from ddetr_cli.cli.main import app
    from ddetr_cli.engine.predictor import Detector

    ds = load_dataset(masked_dataset, "val")

    def stub(*a, **k):
        s = GroundTruthMasks(masked_dataset / "valid" / "_annotations.coco.json")
        s.queue = [int(r.image_id) for r in ds.records]
        return s

    monkeypatch.setattr(Detector, "from_pretrained", classmethod(lambda cls, *a, **k: stub()))
    r = CliRunner().invoke(app, ["eval", str(masked_dataset), "--out", str(tmp_path / "e1"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{"):])
    assert data["metrics"]["AP"] == pytest.approx(1.0) and data["mask_metrics"]["AP"] > 0.9
    r = CliRunner().invoke(app, ["eval", str(masked_dataset), "--out", str(tmp_path / "e2")])
    assert r.exit_code == 0, r.output
    assert "mask" in r.output and "box" in r.output and "mask AP" in r.output

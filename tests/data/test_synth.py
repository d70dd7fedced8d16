"""Synthetic data: determinism, box correctness, agreement between formats and with other readers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv
from pycocotools.coco import COCO

from ddetr_cli.data import synth
from ddetr_cli.data.datasets import load_dataset

REPO = Path(__file__).resolve().parents[2]
ANNOTATION_SUFFIXES = {".json", ".txt", ".xml", ".yaml"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    synth.generate(out, n_train=6, n_val=3, n_test=2, size=(160, 120), seed=0)
    return out


def _files(root: Path, suffixes: set[str] | None = None) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (suffixes is None or p.suffix in suffixes)}


def _by_name(ds) -> dict[str, tuple[np.ndarray, list[str]]]:
    return {r.path.name: (r.boxes, [ds.class_names[k] for k in r.labels]) for r in ds.records}


def test_same_seed_same_files_other_seed_other_files(shapes: Path, tmp_path: Path) -> None:
    synth.generate(tmp_path / "a", n_train=6, n_val=3, n_test=2, size=(160, 120), seed=0)
    synth.generate(tmp_path / "b", n_train=6, n_val=3, n_test=2, size=(160, 120), seed=1)
    first, again, other = _files(shapes), _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first.keys() == again.keys()
    assert first == again  # annotations and JPEG bytes alike
    coco = "coco/train/_annotations.coco.json"
    assert first[coco] != other[coco]
    assert first["coco/train/train_00000.jpg"] != other["coco/train/train_00000.jpg"]


def test_layout_and_yaml(shapes: Path) -> None:
    for split in ("train", "valid", "test"):
        assert (shapes / "coco" / split / "_annotations.coco.json").is_file()
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        assert len(list((shapes / "yolo" / "images" / split).glob("*.jpg"))) == n
        assert len(list((shapes / "yolo" / "labels" / split).glob("*.txt"))) == n
        ids = (shapes / "voc" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert len(ids) == n
        assert all((shapes / "voc" / "Annotations" / f"{i}.xml").is_file() for i in ids)
    yaml = (shapes / "yolo" / "data.yaml").read_text()
    assert "train: images/train" in yaml and "val: images/val" in yaml
    assert "test: images/test" in yaml


def test_boxes_inside_images_and_counts_sane(shapes: Path) -> None:
    data = json.loads((shapes / "coco" / "train" / "_annotations.coco.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4, 5]
    per_image = {i: 0 for i in sizes}
    for a in data["annotations"]:
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
        assert a["iscrowd"] == 0 and a["segmentation"] and 0 < a["area"] <= bw * bh
        per_image[a["image_id"]] += 1
    assert all(1 <= n <= 8 for n in per_image.values())


def test_segmentation_is_the_visible_part_of_each_box(shapes: Path) -> None:
    """The COCO polygons, decoded by pycocotools, are the visible pixels the boxes are tight around."""
    coco = COCO(str(shapes / "coco" / "train" / "_annotations.coco.json"))
    for img in coco.dataset["images"]:
        i = int(img["file_name"].split("_")[1].split(".")[0])
        rng = np.random.default_rng([0, 0, i])  # seed 0, split train: the generator's own draw
        _, boxes, _, visible = synth.render_scene_masks(rng, img["width"], img["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) == len(visible)
        for a, box, vis in zip(anns, boxes, visible):
            m = coco.annToMask(a).astype(bool)
            assert (m & vis).sum() / (m | vis).sum() >= 0.95
            assert a["area"] == vis.sum()
            ys, xs = np.nonzero(vis)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.astype(int).tolist()
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(m)  # the decoded polygon stays within its box
            assert x <= xs.min() and y <= ys.min() and xs.max() < x + w and ys.max() < y + h


def test_masks_cover_the_painted_shape() -> None:
    rng = np.random.default_rng(3)
    image, _, _, visible = synth.render_scene_masks(rng, 200, 150, n_objects=1)
    # the object is saturated, the background is not: saturation marks its pixels
    sat = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 1] > 110
    assert (sat & visible[0]).sum() / (sat | visible[0]).sum() > 0.9


def test_boxes_are_tight_around_visible_pixels() -> None:
    rng = np.random.default_rng(3)
    image, boxes, labels = synth.render_scene(rng, 200, 150, n_objects=1)
    assert len(boxes) == 1
    x1, y1, x2, y2 = boxes[0].astype(int)
    # The object is saturated, the background is not: saturation marks its pixels.
    sat = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 1] > 110
    ys, xs = np.nonzero(sat)
    assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
    assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1


def test_occluded_parts_are_excluded_and_buried_objects_dropped() -> None:
    a = np.zeros((20, 40), bool)
    a[5:15, 0:20] = True                   # object 0
    b = np.zeros_like(a)
    b[0:20, 10:40] = True                  # object 1, on top, hides the right half of 0
    boxes, ratios = synth._visible_boxes([a, b])
    assert boxes[0].tolist() == [0, 5, 10, 15]
    assert boxes[1].tolist() == [10, 0, 40, 20]
    assert ratios.tolist() == [0.5, 1.0]
    c = np.zeros_like(a)
    c[0:20, 0:18] = True                   # buries object 0 down to 2 / 20 columns
    _, ratios = synth._visible_boxes([a, b, c])
    assert ratios[0] < synth.MIN_VISIBLE


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_all_formats_load_to_the_same_boxes(shapes: Path, split: str) -> None:
    coco = _by_name(load_dataset(shapes / "coco", split))
    yolo = _by_name(load_dataset(shapes / "yolo", split))
    voc = _by_name(load_dataset(shapes / "voc", split))
    assert coco.keys() == yolo.keys() == voc.keys()
    assert sum(len(b) for b, _ in coco.values()) > 0
    for name, (boxes, labels) in coco.items():
        assert yolo[name][1] == labels and voc[name][1] == labels
        np.testing.assert_allclose(yolo[name][0], boxes, atol=1.0)
        np.testing.assert_array_equal(voc[name][0], boxes)
        assert np.array_equal(boxes, np.round(boxes))  # whole pixels as written


def test_coco_file_loads_in_pycocotools(shapes: Path) -> None:
    coco = COCO(str(shapes / "coco" / "valid" / "_annotations.coco.json"))
    assert len(coco.getImgIds()) == 3
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == synth.CLASS_NAMES
    assert len(coco.getAnnIds()) > 0


def _sv_by_name(ds: sv.DetectionDataset) -> dict[str, tuple[np.ndarray, list[str]]]:
    out = {}
    for path, det in ds.annotations.items():
        order = np.lexsort(det.xyxy.T[::-1])
        out[Path(path).name] = (det.xyxy[order], [ds.classes[k] for k in det.class_id[order]])
    return out


def _sorted(d: dict[str, tuple[np.ndarray, list[str]]]) -> dict[str, tuple[np.ndarray, list[str]]]:
    out = {}
    for name, (boxes, labels) in d.items():
        order = np.lexsort(boxes.T[::-1])
        out[name] = (boxes[order], [labels[i] for i in order])
    return out


def test_supervision_reads_the_same_boxes(shapes: Path) -> None:
    ours = _sorted(_by_name(load_dataset(shapes / "coco", "train")))
    from_coco = _sv_by_name(sv.DetectionDataset.from_coco(
        str(shapes / "coco" / "train"), str(shapes / "coco" / "train" / "_annotations.coco.json")))
    from_yolo = _sv_by_name(sv.DetectionDataset.from_yolo(
        str(shapes / "yolo" / "images" / "train"), str(shapes / "yolo" / "labels" / "train"),
        str(shapes / "yolo" / "data.yaml")))
    voc_all = _sv_by_name(sv.DetectionDataset.from_pascal_voc(
        str(shapes / "voc" / "JPEGImages"), str(shapes / "voc" / "Annotations")))
    from_voc = {k: v for k, v in voc_all.items() if k.startswith("train_")}
    for theirs, atol in ((from_coco, 0.0), (from_yolo, 1.0), (from_voc, 0.0)):
        assert theirs.keys() == ours.keys()
        for name, (boxes, labels) in ours.items():
            assert theirs[name][1] == labels
            np.testing.assert_allclose(theirs[name][0], boxes, atol=atol)


def test_clip_frames_size_and_truth(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    truth = synth.make_clip(path, frames=12, size=(160, 120), fps=10, seed=2)
    assert len(truth) == 12 and [t["frame"] for t in truth] == list(range(12))
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == 12
    assert frames[0].shape == (120, 160, 3)
    import av

    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    for t in truth:
        b = t["boxes"]
        assert b.shape == (len(t["labels"]), 4) == (len(t["ids"]), 4)
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 160).all() and (b[:, 3] <= 120).all()
    # Same object ids throughout, and they move.
    first, last = truth[0], truth[-1]
    common = np.intersect1d(first["ids"], last["ids"])
    assert len(common) >= 1
    i, j = list(first["ids"]).index(common[0]), list(last["ids"]).index(common[0])
    assert first["labels"][i] == last["labels"][j]
    assert not np.array_equal(first["boxes"][i], last["boxes"][j])


def test_committed_examples_match_the_generator(tmp_path: Path) -> None:
    examples = REPO / "examples"
    total = sum(p.stat().st_size for p in examples.rglob("*") if p.is_file())
    assert total < 3 * 2**20
    synth.make_examples(tmp_path)
    fresh = _files(tmp_path / "data", ANNOTATION_SUFFIXES)
    assert fresh == _files(examples / "data", ANNOTATION_SUFFIXES)
    assert (tmp_path / "images" / "boxes.json").read_bytes() == \
        (examples / "images" / "boxes.json").read_bytes()
    assert (tmp_path / "clip.json").read_bytes() == (examples / "clip.json").read_bytes()
    sizes = {cv2.imread(str(p)).shape[:2] for p in (examples / "images").glob("*.jpg")}
    assert len(sizes) >= 3


def test_clip_falls_back_to_opencv_without_pyav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    path = tmp_path / "clip.mp4"
    synth.make_clip(path, frames=5, size=(64, 48), fps=5)
    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    assert int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little") in (b"mp4v", b"FMP4")  # MPEG-4
    cap.release()

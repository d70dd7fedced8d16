"""Dataset loading: layouts, repairs counted in the report, and one-line errors for fatal problems."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ddetr_cli.data.datasets import DatasetError, detect_format, load_dataset

W, H = 32, 24


def _image(path: Path, bgr: tuple[int, int, int] = (40, 80, 120)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((H, W, 3), bgr, np.uint8))


def _coco_split(root: Path, split: str, images: list[dict], annotations: list[dict],
                categories: list[dict] | None = None, write_images: bool = True) -> Path:
    """A roboflow-style split folder; `images` entries get width/height unless they say otherwise."""
    d = root / split
    d.mkdir(parents=True, exist_ok=True)
    for im in images:
        im.setdefault("width", W)
        im.setdefault("height", H)
        if write_images:
            _image(d / im["file_name"])
    cats = categories or [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    for i, a in enumerate(annotations, start=1):
        a.setdefault("id", i)
        a.setdefault("iscrowd", 0)
    f = d / "_annotations.coco.json"
    f.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return f


def _good_coco(root: Path) -> Path:
    def imgs():
        return [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]

    def anns():
        return [{"image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8]},
                {"image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5]}]

    _coco_split(root, "train", imgs(), anns())
    _coco_split(root, "valid", imgs(), anns())
    return root


# --------------------------------------------------------------------------- layouts


def test_roboflow_coco_loads(tmp_path: Path) -> None:
    root = _good_coco(tmp_path)
    assert detect_format(root) == "coco"
    ds = load_dataset(root, "validation")
    assert ds.split == "val" and ds.format == "coco"
    assert ds.class_names == ["cat", "dog"] and ds.category_ids == [1, 2]
    r = ds.records[0]
    assert r.image_id == 1 and (r.width, r.height) == (W, H)
    assert r.boxes.dtype == np.float32 and r.labels.dtype == np.int64
    np.testing.assert_array_equal(r.boxes, [[2, 3, 12, 11]])
    assert ds.report.summary() == ["2 images, 2 boxes"]


def test_non_contiguous_coco_ids_map_to_contiguous_labels(tmp_path: Path) -> None:
    _coco_split(tmp_path, "train", [{"id": 7, "file_name": "a.png"}],
                [{"image_id": 7, "category_id": 90, "bbox": [1, 1, 4, 4]},
                 {"image_id": 7, "category_id": 3, "bbox": [1, 1, 4, 4]}],
                categories=[{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}])
    ds = load_dataset(tmp_path, "train", val_fraction=0)
    assert ds.class_names == ["car", "toothbrush"] and ds.category_ids == [3, 90]
    assert ds.records[0].labels.tolist() == [1, 0] and ds.records[0].image_id == 7


def test_roboflow_parent_category_is_ignored(tmp_path: Path) -> None:
    _coco_split(tmp_path, "train", [{"id": 0, "file_name": "a.png"}],
                [{"image_id": 0, "category_id": 1, "bbox": [1, 1, 4, 4]}],
                categories=[{"id": 0, "name": "pets", "supercategory": "none"},
                            {"id": 1, "name": "cat", "supercategory": "pets"},
                            {"id": 2, "name": "dog", "supercategory": "pets"}])
    ds = load_dataset(tmp_path, "train", val_fraction=0)
    assert ds.class_names == ["cat", "dog"]
    assert any("pets" in n for n in ds.report.notes)


def test_classic_coco_layout(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    _image(tmp_path / "val2017" / "000001.png")
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000001.png", "width": W, "height": H}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4],
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "person"}]}))
    assert detect_format(tmp_path) == "coco"
    ds = load_dataset(tmp_path, "val")
    assert ds.records[0].path == tmp_path / "val2017" / "000001.png"
    np.testing.assert_array_equal(ds.records[0].boxes, [[1, 2, 4, 6]])


def test_roboflow_yolo_variant_with_dict_names(tmp_path: Path) -> None:
    for split in ("train", "valid"):
        _image(tmp_path / split / "images" / "x.png")
        (tmp_path / split / "labels").mkdir(parents=True)
        (tmp_path / split / "labels" / "x.txt").write_text("1 0.5 0.5 0.25 0.5\n\n")
    (tmp_path / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\nnames:\n  0: cat\n  1: dog\n")
    assert detect_format(tmp_path) == "yolo"
    ds = load_dataset(tmp_path, "valid")
    assert ds.class_names == ["cat", "dog"] and ds.category_ids == [0, 1]
    r = ds.records[0]
    assert r.labels.tolist() == [1]
    np.testing.assert_allclose(r.boxes, [[12, 6, 20, 18]])


def test_yolo_polygon_line_and_missing_label_file(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "train" / "a.png")
    _image(tmp_path / "images" / "train" / "b.png")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.25 0.25 0.75 0.25 0.5 0.75\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [cat]\n")
    ds = load_dataset(tmp_path, "train", val_fraction=0)
    np.testing.assert_allclose(ds.records[0].boxes, [[8, 6, 24, 18]])
    assert ds.records[1].boxes.shape == (0, 4)
    assert any("no label file" in n for n in ds.report.notes)


def test_voc_devkit_convention_and_class_file(tmp_path: Path) -> None:
    _image(tmp_path / "JPEGImages" / "img1.jpg")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "img1.xml").write_text(
        "<annotation><filename>img1.jpg</filename>"
        "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax>"
        "<ymax>12</ymax></bndbox></object></annotation>")
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("img1\n")
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    assert detect_format(tmp_path) == "voc"
    ds = load_dataset(tmp_path, "test")
    assert ds.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(ds.records[0].boxes, [[0, 1, 10, 12]])
    assert ds.records[0].labels.tolist() == [1]
    assert ds.report.sizes_read == 1 and ds.records[0].width == W  # no <size> in the XML


# --------------------------------------------------------------------------- repairs


def test_missing_image_is_skipped_and_named(tmp_path: Path) -> None:
    _coco_split(tmp_path, "train", [{"id": 1, "file_name": "a.png"}], [])
    f = _coco_split(tmp_path, "valid", [{"id": 1, "file_name": "a.png"},
                                        {"id": 2, "file_name": "gone.png"}], [],
                    write_images=False)
    _image(f.parent / "a.png")
    ds = load_dataset(tmp_path, "val")
    assert [r.path.name for r in ds.records] == ["a.png"]
    assert ds.report.missing_images == 1
    assert any("gone.png" in line for line in ds.report.summary())


def test_boxes_outside_are_clipped_and_degenerate_dropped(tmp_path: Path) -> None:
    _coco_split(tmp_path, "train", [{"id": 1, "file_name": "a.png"}], [
        {"image_id": 1, "category_id": 1, "bbox": [-3, 2, 10, 10]},   # left edge out: clip
        {"image_id": 1, "category_id": 1, "bbox": [28, 20, 6, 6]},    # bottom-right out: clip
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, -3, 4]},     # negative width: drop
        {"image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 4]},      # zero width: drop
        {"image_id": 1, "category_id": 2, "bbox": [40, 5, 4, 4]},     # wholly outside: drop
        {"image_id": 1, "category_id": 2, "bbox": [1, 1, 2, 2]},      # fine
    ])
    ds = load_dataset(tmp_path, "train", val_fraction=0)
    np.testing.assert_array_equal(ds.records[0].boxes, [[0, 2, 7, 12], [28, 20, 32, 24],
                                                       [1, 1, 3, 3]])
    rep = ds.report
    assert (rep.clipped, rep.dropped_degenerate, rep.boxes) == (2, 3, 3)
    text = "\n".join(rep.summary())
    assert "clipped 2 boxes" in text and "dropped 3 boxes with zero or negative size" in text


def test_unknown_category_is_dropped_and_named(tmp_path: Path) -> None:
    _coco_split(tmp_path, "train", [{"id": 1, "file_name": "a.png"}], [
        {"image_id": 1, "category_id": 99, "bbox": [1, 1, 4, 4]},
        {"image_id": 1, "category_id": 2, "bbox": [1, 1, 4, 4]}])
    ds = load_dataset(tmp_path, "train", val_fraction=0)
    assert ds.records[0].labels.tolist() == [1]
    assert ds.report.dropped_unknown == 1 and ds.report.unknown_categories == {"99": 1}
    assert any("unknown categories: 99 (1)" in line for line in ds.report.summary())


def test_missing_size_is_read_from_the_file(tmp_path: Path) -> None:
    _coco_split(tmp_path, "train", [{"id": 1, "file_name": "a.png", "width": None,
                                     "height": 0}], [])
    ds = load_dataset(tmp_path, "train", val_fraction=0)
    assert (ds.records[0].width, ds.records[0].height) == (W, H)
    assert ds.report.sizes_read == 1


def test_val_is_carved_from_train_when_missing(tmp_path: Path) -> None:
    for i in range(10):
        _image(tmp_path / "images" / "train" / f"{i}.png")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [cat]\n")
    train = load_dataset(tmp_path, "train", seed=0)
    val = load_dataset(tmp_path, "val", seed=0)
    def names(ds):
        return {r.path.name for r in ds.records}

    assert len(val) == 2 and len(train) == 8
    assert not names(train) & names(val)
    assert names(train) | names(val) == {f"{i}.png" for i in range(10)}
    assert names(load_dataset(tmp_path, "val", seed=0)) == names(val)
    assert any(names(load_dataset(tmp_path, "val", seed=s)) != names(val) for s in (1, 2, 3))
    assert any("no validation split" in n for n in train.report.notes + val.report.notes)
    assert len(load_dataset(tmp_path, "train", val_fraction=0)) == 10


# --------------------------------------------------------------------------- fatal errors


def test_corrupt_json_names_the_file(tmp_path: Path) -> None:
    _good_coco(tmp_path)
    (tmp_path / "valid" / "_annotations.coco.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"valid/_annotations\.coco\.json: not valid JSON"):
        load_dataset(tmp_path, "val")


def test_corrupt_yaml_and_xml_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "y" / "images" / "train").mkdir(parents=True)
    (tmp_path / "y" / "data.yaml").write_text("names: [cat\ntrain: images/train\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: not valid YAML"):
        load_dataset(tmp_path / "y", "train")
    (tmp_path / "v" / "Annotations").mkdir(parents=True)
    (tmp_path / "v" / "Annotations" / "x.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"x\.xml: not valid XML"):
        load_dataset(tmp_path / "v", "train")


def test_empty_split(tmp_path: Path) -> None:
    _good_coco(tmp_path)
    _coco_split(tmp_path, "test", [], [])
    with pytest.raises(DatasetError, match=r"split 'test' is empty"):
        load_dataset(tmp_path, "test")


def test_nonexistent_split_lists_the_ones_there(tmp_path: Path) -> None:
    _good_coco(tmp_path)
    with pytest.raises(DatasetError, match=r"no split 'test'.*splits found: train, val"):
        load_dataset(tmp_path, "test")


def test_all_images_missing(tmp_path: Path) -> None:
    _coco_split(tmp_path, "train", [{"id": 1, "file_name": "nope.png"}], [], write_images=False)
    with pytest.raises(DatasetError, match=r"none of the 1 images.*nope\.png"):
        load_dataset(tmp_path, "train", val_fraction=0)


def test_unknown_format_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="unknown dataset format.*COCO.*YOLO.*VOC"):
        detect_format(tmp_path / "stuff")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="unknown dataset format 'kitti'"):
        load_dataset(tmp_path / "stuff", format="kitti")
    assert issubclass(DatasetError, ValueError)


# --------------------------------------------------------------------------- outputs


def test_record_read_is_rgb(tmp_path: Path) -> None:
    _coco_split(tmp_path, "train", [{"id": 1, "file_name": "a.png"}], [])
    _image(tmp_path / "train" / "a.png", bgr=(0, 0, 255))  # pure red
    img = load_dataset(tmp_path, "train", val_fraction=0).records[0].read()
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [255, 0, 0]


def test_to_coco_dict_evaluates_to_perfect_ap_against_itself(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / "JPEGImages" / f"{i}.jpg")
    (tmp_path / "Annotations").mkdir()
    for i in range(3):
        (tmp_path / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><size><width>{W}</width>"
            f"<height>{H}</height></size>"
            f"<object><name>{'ab'[i % 2]}</name><bndbox><xmin>{i + 1}</xmin><ymin>2</ymin>"
            "<xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>")
    ds = load_dataset(tmp_path, "train", val_fraction=0)
    gt_dict = ds.to_coco_dict()
    assert [c["id"] for c in gt_dict["categories"]] == [1, 2]
    assert gt_dict["annotations"][1]["bbox"] == [1.0, 1.0, 19.0, 19.0]
    gt = COCO()
    gt.dataset = gt_dict
    gt.createIndex()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0} for a in gt_dict["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN"])
def test_yolo_non_finite_label_names_file_and_line(bad: str, tmp_path: Path) -> None:
    _image(tmp_path / "images" / "train" / "a.png")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text(f"0 0.5 0.5 0.2 0.2\n\n1 0.5 {bad} 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [cat, dog]\n")
    with pytest.raises(DatasetError, match=r"labels/train/a\.txt:3: non-finite"):
        load_dataset(tmp_path, "train", val_fraction=0)


def test_yolo_non_finite_class_is_refused(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "train" / "a.png")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("nan 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [cat]\n")
    with pytest.raises(DatasetError, match=r"a\.txt:1: non-finite"):
        load_dataset(tmp_path, "train", val_fraction=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "nan", "-Infinity"])
def test_coco_non_finite_bbox_names_the_file(bad: object, tmp_path: Path) -> None:
    _coco_split(tmp_path, "train", [{"id": 1, "file_name": "a.png"}],
                [{"image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8]},
                 {"image_id": 1, "category_id": 2, "bbox": [2, bad, 10, 8]}])
    with pytest.raises(DatasetError, match=r"train/_annotations\.coco\.json: annotation 2 .*non-finite"):
        load_dataset(tmp_path, "train", val_fraction=0)


def test_voc_non_finite_box_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "Annotations").mkdir()
    _image(tmp_path / "JPEGImages" / "x.png")
    (tmp_path / "Annotations" / "x.xml").write_text(
        "<annotation><filename>x.png</filename><size><width>32</width><height>24</height></size>"
        "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>nan</ymin><xmax>5</xmax><ymax>6</ymax>"
        "</bndbox></object></annotation>")
    with pytest.raises(DatasetError, match=r"x\.xml: object 'cat' has a non-finite bndbox"):
        load_dataset(tmp_path, "train", val_fraction=0)

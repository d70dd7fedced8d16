"""The label table: COCO ids for models with the published COCO table, a dataset's own ids after
fine-tuning on it, ids from 1 otherwise; the same ids in every output."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import make_hf_model, save_hub, unresized_image
from PIL import Image
from typer.testing import CliRunner

from ddetr_cli.cli.main import app
from ddetr_cli.formats.labels import LabelTable
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.deformable_detr import DeformableDETR
from ddetr_cli.weights.load import load_model, save_model

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "data"


def published_coco_id2label() -> dict[int, str]:
    """The ``id2label`` of the published COCO checkpoints' config.json: 91 slots, "N/A" at 0 and
    at the ten unused COCO ids. Taken from torchvision's COCO category list (index = COCO id,
    "__background__" at 0), a table independent of the code under test."""
    from torchvision.models._meta import _COCO_CATEGORIES

    assert len(_COCO_CATEGORIES) == 91
    return {i: ("N/A" if i == 0 else name) for i, name in enumerate(_COCO_CATEGORIES)}


# ----------------------------------------------------------------------------- the rule


def test_table_rules():
    # other models: ids from 1 in label order, YOLO 0-based
    t = LabelTable.from_names(["cat", "dog"])
    assert [(c.label, c.id, c.name, c.yolo) for c in t] == [(0, 1, "cat", 0), (1, 2, "dog", 1)]
    # slot 0 unnamed: label index is the category id, placeholders are not categories
    t = LabelTable.from_names(["N/A", "person", "", "car", "LABEL_4"])
    assert [(c.label, c.id, c.name, c.yolo) for c in t] == [(1, 1, "person", 0), (3, 3, "car", 1)]
    assert t.has_unnamed and t.category_id(2) is None and t.name(2) == "2"
    # a dataset's own ids win
    t = LabelTable.from_names(["a", "b", "c"], [3, 7, 11])
    assert [c.id for c in t] == [3, 7, 11] and [c.yolo for c in t] == [0, 1, 2]
    # no names at all: every label is a category named by its index
    t = LabelTable.from_names(["", ""])
    assert [(c.id, c.name) for c in t] == [(1, "0"), (2, "1")]
    with pytest.raises(ValueError, match="unique"):
        LabelTable.from_names(["a", "b"], [4, 4])
    with pytest.raises(ValueError, match="category ids"):
        ModelConfig(num_classes=2, class_names=["a", "b"], category_ids=[1])


def test_things_and_stuff():
    """isthing: COCO panoptic's list for a table in its convention (label = category id), the
    recorded stuff ids otherwise, all things by default; kept through save and load."""
    from ddetr_cli.formats.labels import coco_panoptic_class_names

    # COCO panoptic stuff, as panopticapi's panoptic_coco_categories.json lists it (isthing 0)
    stuff = {92, 93, 95, 100, 107, 109, 112, 118, 119, 122, 125, 128, 130, 133, 138, 141, 144, 145, 147, 148, 149,
             151, 154, 155, 156, 159, 161, 166, 168, 171, 175, 176, 177, 178, 180, 181, *range(184, 201)}
    t = LabelTable.from_names(coco_panoptic_class_names(250))
    assert len(t) == 133 and {c.id for c in t if not c.isthing} == stuff and t.stuff_labels == sorted(stuff)
    assert t.get(1).name == "person" and t.get(1).isthing and t.get(187).name == "sky-other-merged"
    assert {c["id"]: c["isthing"] for c in t.panoptic_categories()}[193] == 0
    assert all(c.isthing for c in LabelTable.from_names(["N/A", "person", "car"]))
    t = LabelTable.from_names(["shape", "sky"], [4, 9], stuff_ids=[9])
    assert [(c.id, c.isthing) for c in t] == [(4, True), (9, False)]
    cfg = ModelConfig.from_variant("detr", masks=True, num_classes=2, class_names=["shape", "sky"], category_ids=[4, 9],
                                   stuff_ids=[9], backbone_depth=18, d_model=64, enc_layers=1, dec_layers=1,
                                   dim_feedforward=64, num_queries=4)
    assert ModelConfig.from_dict(cfg.to_dict()).labels.stuff_labels == [1]


def test_category_ids_survive_save_and_load(tmp_path):
    cfg = ModelConfig(num_classes=3, class_names=["a", "b", "c"], category_ids=[3, 7, 11], backbone_depth=18,
                      d_model=64, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=10)
    path = save_model(DeformableDETR(cfg), tmp_path / "m.safetensors")
    assert [(c.id, c.name) for c in load_model(path).cfg.labels] == [(3, "a"), (7, "b"), (11, "c")]


# ----------------------------------------------------------------------------- published COCO table


def _coco_hub_folder(tmp_path: Path) -> tuple[object, Path]:
    """A random transformers Deformable DETR saved as a hub folder whose config has the published
    COCO ``id2label``, with scores spread so that many labels (including "N/A" slots) score high."""
    id2label = published_coco_id2label()
    hf = make_hf_model("multi-scale", seed=3, num_labels=91)
    hf.config.id2label = id2label
    hf.config.label2id = {v: k for k, v in id2label.items() if v != "N/A"}
    with torch.no_grad():
        for head in hf.class_embed:
            head.bias.normal_(0.0, 1.5)
            head.bias[[12, 26]] += 3.0  # two "N/A" slots score high: their detections must not be written
    save_hub(hf, tmp_path / "hub")
    cfg = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert cfg["id2label"]["0"] == "N/A" and cfg["id2label"]["1"] == "person" and cfg["id2label"]["12"] == "N/A"
    return hf, tmp_path / "hub"


def test_published_coco_table_gives_coco_ids_everywhere(tmp_path):
    """A hub folder with the published COCO id2label: 80 categories with COCO's ids and names, each
    detection's category_id equal to transformers' label index for it, YOLO classes 0..79 in id
    order, VOC names."""
    from transformers import DeformableDetrImageProcessor

    hf, hub = _coco_hub_folder(tmp_path)
    coco = {i: n for i, n in published_coco_id2label().items() if n != "N/A"}
    img = unresized_image(tmp_path / "im.png")

    proc = DeformableDetrImageProcessor()
    with torch.no_grad():
        outputs = hf(**proc(images=Image.open(img), return_tensors="pt"))
    every = proc.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(800, 1000)], top_k=91 * 20)[0]
    conf = float(every["scores"][60])  # about 60 detections: below the 100 that detect keeps
    ref = proc.post_process_object_detection(outputs, threshold=conf, target_sizes=[(800, 1000)], top_k=91 * 20)[0]
    ref_labels = [int(x) for x in ref["labels"]]
    assert sum(coco.get(x) is None for x in ref_labels) >= 1, "the test wants an N/A-slot detection to drop"
    assert sum(coco.get(x) is not None for x in ref_labels) >= 5

    out = tmp_path / "o"
    r = runner.invoke(app, ["detect", str(img), "--model", str(hub), "--conf", str(conf), "--out", str(out),
                            "--no-save-images", "--quiet", "--format", "coco,yolo,voc"])
    assert r.exit_code == 0, r.output
    pred = json.loads((out / "predictions.json").read_text())

    # 80 categories: COCO's ids and names, nothing else
    assert len(pred["categories"]) == 80
    assert {c["id"]: c["name"] for c in pred["categories"]} == coco
    assert next(c for c in pred["categories"] if c["id"] == 1)["supercategory"] == "person"

    # every detection carries transformers' own label index (= COCO id) for the same box and score
    kept = [(float(s), int(lab), b.numpy()) for s, lab, b in zip(ref["scores"], ref["labels"], ref["boxes"])
            if int(lab) in coco]
    assert len(pred["annotations"]) == len(kept)
    for a in pred["annotations"]:
        x, y, w, h = a["bbox"]
        ours = np.array([x, y, x + w, y + h])
        match = [lab for s, lab, b in kept if abs(s - a["score"]) <= 1e-3
                 and np.abs(ours - b.clip(min=0).clip(max=[1000, 800, 1000, 800])).max() <= 0.5]
        assert match and a["category_id"] in match, a

    # YOLO: contiguous 0..79 in COCO id order; VOC: the COCO names
    by_index = [coco[i] for i in sorted(coco)]
    lines = (out / "labels" / "im.txt").read_text().splitlines()
    voc = [o.findtext("name") for o in ET.parse(out / "voc" / "Annotations" / "im.xml").getroot().iter("object")]
    assert len(lines) == len(voc) == len(pred["annotations"])
    names_by_id = {c["id"]: c["name"] for c in pred["categories"]}
    expected = sorted(names_by_id[a["category_id"]] for a in pred["annotations"])
    assert sorted(by_index[int(line.split()[0])] for line in lines) == expected
    assert sorted(voc) == expected


def test_coco_table_on_the_video_jsonl(tmp_path):
    """The video JSON Lines carry the same category ids as predictions.json."""
    import av

    _, hub = _coco_hub_folder(tmp_path)
    clip = tmp_path / "c.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray((rng.random((240, 320, 3)) * 255).astype(np.uint8), format="rgb24")
            for p in stream.encode(frame):
                container.mux(p)
        for p in stream.encode():
            container.mux(p)
    out = tmp_path / "v"
    r = runner.invoke(app, ["video", str(clip), "--model", str(hub), "--conf", "0.3", "--out", str(out),
                            "--save-json", "--quiet", "--imgsz", "320"])
    assert r.exit_code == 0, r.output
    coco = {i: n for i, n in published_coco_id2label().items() if n != "N/A"}
    dets = [d for line in next(out.glob("*.jsonl")).read_text().splitlines() for d in json.loads(line)["detections"]]
    assert dets
    for d in dets:
        assert d["category_id"] == d["label"] and coco[d["category_id"]] == d["class"]


# ----------------------------------------------------------------------------- a dataset's own ids


def test_finetune_on_non_contiguous_ids_then_detect_and_eval(tmp_path):
    """A COCO dataset numbered 3, 7, 11, 20, 42 -> finetune -> detect writes those ids and names;
    eval matches them by id."""
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES / "coco", data)
    new_ids = [3, 7, 11, 20, 42]
    for ann in data.glob("*/_annotations.coco.json"):
        d = json.loads(ann.read_text())
        remap = {c["id"]: new for c, new in zip(sorted(d["categories"], key=lambda c: c["id"]), new_ids)}
        for c in d["categories"]:
            c["id"] = remap[c["id"]]
        for a in d["annotations"]:
            a["category_id"] = remap[a["category_id"]]
        ann.write_text(json.dumps(d))
    categories = {c["id"]: c["name"] for c in json.loads((data / "train" / "_annotations.coco.json").read_text())["categories"]}
    assert sorted(categories) == new_ids

    arch = ["backbone_depth=18", "d_model=64", "nheads=4", "enc_layers=1", "dec_layers=1", "num_queries=20",
            "dim_feedforward=128"]
    args = ["finetune", str(data), "--scratch", "--imgsz", "128", "--batch", "2", "--workers", "0", "--epochs", "1",
            "--max-steps", "2", "--out", str(tmp_path / "runs"), "--quiet"]
    for a in arch:
        args += ["--arch", a]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    best = next((tmp_path / "runs").glob("*/best.safetensors"))

    out = tmp_path / "det"
    r = runner.invoke(app, ["detect", str(data / "valid"), "--model", str(best), "--conf", "0.0", "--out", str(out),
                            "--no-save-images", "--quiet"])
    assert r.exit_code == 0, r.output
    pred = json.loads((out / "predictions.json").read_text())
    assert {c["id"]: c["name"] for c in pred["categories"]} == categories
    assert pred["annotations"] and {a["category_id"] for a in pred["annotations"]} <= set(new_ids)

    from ddetr_cli.data.datasets import load_dataset
    from ddetr_cli.engine.evaluator import match_classes
    from ddetr_cli.engine.predictor import Detector

    mapping = match_classes(Detector.from_pretrained(best, device="cpu").labels, load_dataset(data, "valid"))
    assert mapping.mode == "id" and sorted(mapping.label_to_cat.values()) == new_ids

"""Panoptic inference: ``ddetr detect --panoptic`` on a random-weight transformers
DetrForSegmentation (hub layout, COCO panoptic label table) against transformers'
``post_process_panoptic_segmentation``, read back from the files it writes; the merging rules on
hand-made outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import make_hf_detr, save_hub
from PIL import Image
from typer.testing import CliRunner

from ddetr_cli.cli.main import app
from ddetr_cli.data.transforms import preprocess
from ddetr_cli.engine.panoptic import merge_panoptic

pytest.importorskip("transformers")
runner = CliRunner()

IMGSZ, MAX_SIZE = 128, 213  # detect's --imgsz 128 and the long side it implies (128 * 1333 / 800)
# COCO panoptic ids the crafted model predicts (label index = category id in that table):
THINGS = [1, 3, 18]  # person, car, dog
STUFF = [184, 187, 193]  # tree-merged, sky-other-merged, grass-merged (isthing 0 in COCO panoptic)


def _image(folder: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A noise image with a gradient (so that the masks follow the image) as ``folder/im.png``."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    xx = np.mgrid[0:h, 0:w][1]
    arr = (rng.random((h, w, 3)) * 80).astype(np.uint8)
    arr[..., 0] += (xx * 150 // w).astype(np.uint8)
    Image.fromarray(arr).save(folder / "im.png")
    return arr


@torch.no_grad()
def make_panoptic_hf(image: np.ndarray):
    """A small DetrForSegmentation whose 250-slot COCO panoptic label table is in its hub config,
    with heads set so that its queries differ in class and mask (random DETR decoders give
    nearly equal queries): the class head and the attention queries act on each query's
    deviation from the mean query (measured on ``image``); only THINGS and STUFF are predicted."""
    from ddetr_cli.formats.labels import coco_panoptic_class_names

    names = coco_panoptic_class_names(250)
    hf = make_hf_detr(segmentation=True, seed=2, num_labels=250)
    hf.config.id2label = {i: (n or "N/A") for i, n in enumerate(names)}
    hf.config.label2id = {}
    pixels, mask = preprocess([image], IMGSZ, MAX_SIZE)
    hs = hf(pixel_values=pixels, pixel_mask=(~mask).long()).last_hidden_state[0]
    mu = hs.mean(0)
    dev = hs - mu
    g = torch.Generator().manual_seed(0)
    head = hf.detr.class_labels_classifier
    w = torch.zeros_like(head.weight)
    used = THINGS + STUFF + [250]  # 250 = "no object"
    w[used] = torch.randn(len(used), w.shape[1], generator=g)
    w = w / (dev @ w[used].T).std() * 3
    head.weight.copy_(w)
    head.bias.copy_(-w @ mu)
    head.bias[[i for i in range(251) if i not in used]] = -30.0
    ql = hf.bbox_attention.q_linear
    ql.weight.mul_(3 / (dev @ ql.weight.T).std())
    ql.bias.copy_(-ql.weight @ mu)
    # let the per-query attention maps, not the shared FPN features, shape the masks
    heads = hf.config.decoder_attention_heads
    hf.mask_head.lay1.weight[:, -heads:].mul_(300)
    hf.mask_head.lay1.weight[:, :-heads].mul_(0.1)
    for a in (hf.mask_head.adapter1, hf.mask_head.adapter2, hf.mask_head.adapter3):
        a.weight.mul_(0.1)
        a.bias.mul_(0.1)
    return hf


def read_png_ids(path: Path) -> np.ndarray:
    """COCO panoptic PNG -> ids, read here independently of formats.panoptic."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _reference(hf, image: np.ndarray, threshold: float) -> tuple[np.ndarray, dict[int, tuple[int, bool]]]:
    """transformers' panoptic result for one image -> (ids (H, W), id -> (label, fused))."""
    from transformers import DetrImageProcessor

    pixels, mask = preprocess([image], IMGSZ, MAX_SIZE)
    with torch.no_grad():
        out = hf(pixel_values=pixels, pixel_mask=(~mask).long())
    [r] = DetrImageProcessor().post_process_panoptic_segmentation(
        out, threshold=threshold, label_ids_to_fuse=set(STUFF), target_sizes=[image.shape[:2]])
    segs = {s["id"]: (s["label_id"], s["was_fused"]) for s in r["segments_info"]}
    return r["segmentation"].numpy().astype(np.int64), segs


def _match(ref: np.ndarray, ours: np.ndarray) -> dict[int, int]:
    """ref id -> our id of largest overlap."""
    out = {}
    for i in np.unique(ref):
        if i == 0:
            continue
        ids, counts = np.unique(ours[ref == i], return_counts=True)
        out[int(i)] = int(ids[np.argmax(counts)])
    return out


@pytest.mark.parametrize("h,w,seed", [(150, 200, 0), (100, 160, 2)])
def test_detect_panoptic_matches_transformers(h, w, seed, tmp_path):
    image = _image(tmp_path / "imgs", h, w, seed)
    hf = make_panoptic_hf(image)
    save_hub(hf, tmp_path / "hub")
    thr = 0.5
    run = tmp_path / "run"
    r = runner.invoke(app, ["detect", str(tmp_path / "imgs"), "--model", str(tmp_path / "hub"), "--out", str(run),
                            "--imgsz", str(IMGSZ), "--panoptic", "--panoptic-conf", str(thr), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["outputs"]["panoptic"] == str(run / "panoptic.json")
    data = json.loads((run / "panoptic.json").read_text())
    cats = {c["id"]: c for c in data["categories"]}
    assert all(cats[i]["isthing"] == 1 for i in THINGS) and all(cats[i]["isthing"] == 0 for i in STUFF)
    assert len(cats) == 133  # COCO panoptic's 80 things + 53 stuff, unnamed slots left out
    [im], [ann] = data["images"], data["annotations"]
    assert ann["image_id"] == im["id"] and (im["height"], im["width"]) == (h, w) and ann["file_name"] == "im.png"
    ours = read_png_ids(run / "panoptic" / ann["file_name"])
    assert ours.shape == (h, w)
    ref, ref_segs = _reference(hf, image, thr)
    info = {s["id"]: s for s in ann["segments_info"]}
    assert len(info) == len(ann["segments_info"])
    # same segments: one of ours per reference segment, same category, the same pixels
    assert set(np.unique(ours)) - {0} == set(info)
    mapping = _match(ref, ours)
    assert sorted(mapping) == sorted(ref_segs) and len(set(mapping.values())) == len(mapping) == len(info)
    for rid, oid in mapping.items():
        assert info[oid]["category_id"] == ref_segs[rid][0]
        assert info[oid]["isthing"] == int(ref_segs[rid][0] not in STUFF)
    mapped = np.vectorize(lambda v: mapping.get(int(v), -1) if v else 0)(ref)
    agree = (mapped == ours).mean()
    assert agree >= 0.999, agree
    # area and bbox as the PNG has them
    for sid, s in info.items():
        ys, xs = np.nonzero(ours == sid)
        assert s["area"] == len(xs)
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # enough to compare: at least three segments, things and stuff
    assert len(info) >= 3 and {s["isthing"] for s in info.values()} == {0, 1}, info
    # annotated images show the segment map
    shown = np.asarray(Image.open(run / "annotated" / "im.png").convert("RGB")).astype(int)
    assert np.abs(shown - image.astype(int)).mean() > 5


def _logits(rows: list[tuple[int, float]], c: int = 4) -> torch.Tensor:
    """(label, probability) per query -> (Q, c+1) logits with that softmax maximum."""
    out = torch.full((len(rows), c + 1), -20.0)
    for q, (label, p) in enumerate(rows):
        out[q, label] = 0.0
        out[q, c] = float(np.log((1 - p) / p))  # the rest of the mass on "no object"
    return out


def test_merge_rules():
    """Per-pixel argmax of score-weighted masks; a query keeping <= 80% of its own mask is
    dropped (its pixels: no segment); queries of one stuff class share a segment; ``classes``
    filters; low scores never take part."""
    h, w = 8, 12
    m = torch.full((5, h, w), -10.0)
    m[0, :, :5] = 10  # thing (label 0), left
    m[1, 4:, 6:] = 10  # stuff (label 2), bottom right
    m[2, :4, 6:] = 10  # stuff (label 2) again, top right: fused with query 1
    m[3, :, 4:7] = 10  # label 1, wins only column 5 (8 of its 24 pixels): dropped
    m[4] = 10  # scores 0.5: below the threshold
    logits = _logits([(0, 0.99), (2, 0.95), (2, 0.97), (1, 0.9), (3, 0.5)])
    p = merge_panoptic(logits, m, (h, w), stuff_labels=[2], threshold=0.85)
    assert [(s.id, s.label) for s in p.segments] == [(1, 0), (2, 2)]
    assert p.segments[1].score == pytest.approx(0.95, abs=1e-6)  # the first query of the stuff segment
    want = np.zeros((h, w), np.int32)
    want[:, :5], want[:, 6:] = 1, 2
    assert np.array_equal(p.segmap, want)
    q = merge_panoptic(logits, m, (h, w), stuff_labels=[], threshold=0.85)
    assert [(s.id, s.label) for s in q.segments] == [(1, 0), (2, 2), (3, 2)]
    want[:4, 6:] = 3
    assert np.array_equal(q.segmap, want)
    # only label 2: its queries compete everywhere (the argmax is over every pixel) and fuse
    r = merge_panoptic(logits, m, (h, w), stuff_labels=[2], threshold=0.85, classes=[2])
    assert [s.label for s in r.segments] == [2] and (r.segmap == 1).all()
    none = merge_panoptic(logits, m, (h, w), threshold=0.999)
    assert none.segments == [] and not none.segmap.any()


def test_merge_cuts_padding():
    """The same image alone and at the top-left of a padded input: the same map."""
    g = torch.Generator().manual_seed(0)
    logits = _logits([(0, 0.9), (1, 0.95), (2, 0.99)])
    small = torch.randn(3, 6, 8, generator=g) - 6
    small[0, :, :3] += 12
    small[1, :3, 3:] += 12
    small[2, 3:, 3:] += 12
    alone = merge_panoptic(logits, small, (30, 40), threshold=0.5)
    padded = torch.full((3, 9, 10), -5.0)
    padded[:, :6, :8] = small
    inside = merge_panoptic(logits, padded, (30, 40), threshold=0.5, padded_hw=(36, 40), valid_hw=(24, 32))
    # (> 98%: without stuff classes a pixel no mask claims is left out, and the bottom/right
    # edge pixels of the padded map blend with the padding's -5 in the bilinear resize)
    assert len(alone.segments) == 3 and (alone.segmap == inside.segmap).mean() > 0.98
    # the reference's way, resizing the padded map to the image, would shift the segments
    naive = merge_panoptic(logits, padded, (30, 40), threshold=0.5)
    assert (naive.segmap == alone.segmap).mean() < 0.9


def _tiny_mask_detr(path: Path) -> Path:
    """A small random mask-head DETR of the synthetic shapes' classes, "ring" (id 5) as stuff."""
    from ddetr_cli.models.build import build_model
    from ddetr_cli.models.config import ModelConfig
    from ddetr_cli.weights.load import save_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_variant("detr", masks=True, num_classes=5, backbone_depth=18, d_model=64, nheads=8,
                                   enc_layers=1, dec_layers=1, dim_feedforward=128, num_queries=12,
                                   class_names=["circle", "square", "triangle", "cross", "ring"], stuff_ids=[5])
    model = build_model(cfg)
    with torch.no_grad():  # random heads give near-uniform scores and masks near 0.5: spread, lift
        model.class_embed.weight.mul_(20)
        model.mask_head.out_lay.bias.add_(3.0)
        # a random decoder's queries are nearly equal and split the image into fragments, which
        # the merging drops; equal queries tie, and the first takes the whole image
        model.query_embed.weight.copy_(model.query_embed.weight[:1].expand_as(model.query_embed.weight))
    return save_model(model, path)


def test_video_panoptic_writes_one_map_per_frame(tmp_path):
    from ddetr_cli.engine.predictor import Detector
    from ddetr_cli.engine.video import run_video

    root = Path(__file__).resolve().parents[2]
    det = Detector.from_pretrained(str(_tiny_mask_detr(tmp_path / "m.safetensors")), device="cpu", imgsz=64)
    assert [c.isthing for c in det.labels] == [True, True, True, True, False]
    res = run_video(det, root / "examples" / "clip.mp4", tmp_path / "vid", save=True, panoptic=True, panoptic_conf=0.3,
                    handle_signals=False)
    data = json.loads(Path(res.outputs["panoptic"]).read_text())
    assert res.frames == len(data["images"]) == len(data["annotations"]) == 45
    assert [im["frame"] for im in data["images"]] == list(range(45))
    assert {c["name"]: c["isthing"] for c in data["categories"]}["ring"] == 0
    n = 0
    for ann in data["annotations"]:
        ids = read_png_ids(tmp_path / "vid" / "clip_panoptic" / ann["file_name"])
        assert ids.shape == (240, 320)
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        n += len(ann["segments_info"])
    assert n > 0 and Path(res.outputs["video"]).stat().st_size > 0


def test_merge_sigmoid_scores_like_softmax():
    """Deformable DETR's sigmoid logits (Q, C), no "no object" class: a query's score is its best
    class's probability, and with the same scores the merging gives the same map as DETR's."""
    h, w = 8, 12
    m = torch.full((5, h, w), -10.0)
    m[0, :, :5] = 10
    m[1, 4:, 6:] = 10
    m[2, :4, 6:] = 10
    m[3, :, 4:7] = 10
    m[4] = 10
    rows = [(0, 0.99), (2, 0.95), (2, 0.97), (1, 0.9), (3, 0.5)]
    sigmoid = torch.full((5, 4), -20.0)
    for q, (label, p) in enumerate(rows):
        sigmoid[q, label] = float(np.log(p / (1 - p)))
    sigmoid[0, 1] = float(np.log(0.6 / 0.4))  # a second class below the best does not matter
    want = merge_panoptic(_logits(rows), m, (h, w), stuff_labels=[2], threshold=0.85)
    got = merge_panoptic(sigmoid, m, (h, w), stuff_labels=[2], threshold=0.85, no_object=False)
    assert [(s.id, s.label) for s in got.segments] == [(s.id, s.label) for s in want.segments] == [(1, 0), (2, 2)]
    assert [s.score for s in got.segments] == pytest.approx([s.score for s in want.segments], abs=1e-6)
    assert np.array_equal(got.segmap, want.segmap)
    # the last column is a real class here: label 3 at 0.999 forms a segment of its own
    sigmoid[4, 3] = float(np.log(0.999 / 0.001))
    m[4] = -10.0
    m[4, :, 11:] = 10
    last = merge_panoptic(sigmoid, m, (h, w), stuff_labels=[2], threshold=0.85, no_object=False)
    assert 3 in [s.label for s in last.segments]

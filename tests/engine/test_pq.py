"""Panoptic quality: ``engine.pq`` against an independent implementation written here from the
definition (Kirillov et al., 2019, and panopticapi's void / crowd rules), on files: the synthetic
panoptic ground truth, corrupted copies of it, and ``ddetr eval --panoptic``'s own output."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ddetr_cli.cli.main import app
from ddetr_cli.data.synth import generate_panoptic
from ddetr_cli.engine.pq import pq_compute

runner = CliRunner()


# ------------------------------------------------------------------ the reference, from the definition


def _ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)


def reference_pq(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict:
    """PQ by the definition, one boolean mask per segment: a match is same category and IoU > 0.5,
    where the IoU leaves out predicted pixels on unlabeled ground truth; crowd ground truth is
    never a miss, and a prediction mostly (> 1/2) on unlabeled or same-category crowd pixels is
    never a false positive. -> {"All"|"Things"|"Stuff": (pq, sq, rq, n), category: (pq, sq, rq)}."""
    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    isthing = {c["id"]: bool(c["isthing"]) for c in gt["categories"]}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    tp, fp, fn, iou_sum = Counter(), Counter(), Counter(), defaultdict(float)
    for a in gt["annotations"]:
        g_map = _ids(gt_dir / a["file_name"])
        p_ann = preds[a["image_id"]]
        p_map = _ids(pred_dir / p_ann["file_name"])
        g_segs = {s["id"]: s for s in a["segments_info"]}
        p_segs = {s["id"]: s for s in p_ann["segments_info"]}
        unlabeled = ~np.isin(g_map, list(g_segs))
        crowd = defaultdict(lambda: np.zeros(g_map.shape, bool))
        for gid, s in g_segs.items():
            if s.get("iscrowd"):
                crowd[s["category_id"]] |= g_map == gid
        g_done, p_done = set(), set()
        for gid, gs in g_segs.items():
            if gs.get("iscrowd"):
                continue
            gm = g_map == gid
            for pid, ps in p_segs.items():
                if ps["category_id"] != gs["category_id"]:
                    continue
                pm = p_map == pid
                inter = np.count_nonzero(gm & pm)
                union = np.count_nonzero(gm | pm) - np.count_nonzero(pm & unlabeled)
                if inter and inter / union > 0.5:
                    tp[gs["category_id"]] += 1
                    iou_sum[gs["category_id"]] += inter / union
                    g_done.add(gid)
                    p_done.add(pid)
        for gid, gs in g_segs.items():
            if gid not in g_done and not gs.get("iscrowd"):
                fn[gs["category_id"]] += 1
        for pid, ps in p_segs.items():
            pm = p_map == pid
            if pid in p_done or not pm.any():
                continue
            c = ps["category_id"]
            ignored = np.count_nonzero(pm & unlabeled) + (np.count_nonzero(pm & crowd[c]) if c in crowd else 0)
            if ignored / np.count_nonzero(pm) <= 0.5:
                fp[c] += 1
    out: dict = {}
    groups = {"All": [], "Things": [], "Stuff": []}
    for c in isthing:
        if tp[c] + fp[c] + fn[c] == 0:
            continue
        d = tp[c] + fp[c] / 2 + fn[c] / 2
        v = (iou_sum[c] / d, iou_sum[c] / tp[c] if tp[c] else 0.0, tp[c] / d)
        out[c] = v
        groups["All"].append(v)
        groups["Things" if isthing[c] else "Stuff"].append(v)
    for k, vals in groups.items():
        out[k] = (*np.mean(vals, 0), len(vals)) if vals else (0.0, 0.0, 0.0, 0)
    return out


def _assert_same(res, ref: dict) -> None:
    for k in ("All", "Things", "Stuff"):
        got = res.summary[k]
        assert got["n"] == ref[k][3], k
        for i, name in enumerate(("pq", "sq", "rq")):
            assert got[name] == pytest.approx(ref[k][i], abs=1e-6), (k, name)
    rows = {r["id"]: r for r in res.per_class}
    for c, v in ref.items():
        if isinstance(c, int):
            assert (rows[c]["pq"], rows[c]["sq"], rows[c]["rq"]) == pytest.approx(v, abs=1e-6), c


# ------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def panoptic_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("panoptic")
    generate_panoptic(root, n_train=0, n_val=6, size=(160, 120), seed=3)
    return root


def _write_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _corrupt(root: Path, out: Path, seed: int = 0) -> tuple[Path, Path, Path, Path]:
    """Predictions made from the ground truth by moving, dropping, relabelling, splitting and
    inventing segments, and a copy of the ground truth with unlabeled pixels (a thing that the
    prediction keeps, a band of stuff) and a crowd region (a thing that the prediction keeps)."""
    rng = np.random.default_rng(seed)
    gt = json.loads((root / "annotations" / "panoptic_val.json").read_text())
    gt_dir = root / "annotations" / "panoptic_val"
    thing_ids = [c["id"] for c in gt["categories"] if c["isthing"]]
    stuff_ids = [c["id"] for c in gt["categories"] if not c["isthing"]]
    pred = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
    for a in gt["annotations"]:
        g = _ids(gt_dir / a["file_name"])
        p = g.copy()
        segs = [dict(s) for s in a["segments_info"]]
        things = [s for s in segs if s["isthing"]]
        untouched = []
        next_id = max(s["id"] for s in segs) + 1
        for s in things:
            r = rng.random()
            if r < 0.15:  # dropped: a miss, its pixels unlabeled
                p[p == s["id"]] = 0
                segs.remove(s)
            elif r < 0.4:  # moved: IoU falls, maybe below 0.5
                m = g == s["id"]
                p[m & (p == s["id"])] = 0
                p[np.roll(m, int(rng.integers(1, 8)), axis=int(rng.integers(0, 2)))] = s["id"]
            elif r < 0.55:  # another category
                s["category_id"] = int(rng.choice([t for t in thing_ids if t != s["category_id"]]))
            elif r < 0.7:  # split in two
                xs = np.nonzero(g == s["id"])[1]
                half = (g == s["id"]) & (np.arange(g.shape[1])[None, :] < np.median(xs) + rng.integers(-3, 4))
                p[half] = next_id
                segs.append({**s, "id": next_id})
                next_id += 1
            else:
                untouched.append(s["id"])
        if rng.random() < 0.5:  # a stuff segment relabelled
            st = [s for s in segs if not s["isthing"]]
            st[0]["category_id"] = int(rng.choice([t for t in stuff_ids if t != st[0]["category_id"]]))
        y, x = int(rng.integers(0, 80)), int(rng.integers(0, 120))
        p[y : y + 30, x : x + 30] = next_id  # an invented thing
        segs.append({"id": next_id, "category_id": int(rng.choice(thing_ids)), "isthing": 1, "iscrowd": 0})
        present = set(np.unique(p).tolist())
        segs = [s for s in segs if s["id"] in present]
        _write_png(out / "pred" / a["file_name"], p)
        pred["annotations"].append({"image_id": a["image_id"], "file_name": a["file_name"], "segments_info": segs})
        # the ground truth's unlabeled and crowd pixels, where the prediction has segments
        gt_segs = a["segments_info"]
        if untouched:
            gid = untouched.pop()
            g[g == gid] = 0
            a["segments_info"] = gt_segs = [s for s in gt_segs if s["id"] != gid]
        if untouched:
            next(s for s in gt_segs if s["id"] == untouched[0])["iscrowd"] = 1
        sky = [s["id"] for s in gt_segs if not s["isthing"]][0]
        g[(g == sky) & (np.arange(g.shape[0])[:, None] % 10 < 3)] = 0
        _write_png(out / "gt" / a["file_name"], g)
    (out / "pred.json").write_text(json.dumps(pred))
    (out / "gt.json").write_text(json.dumps(gt))
    return out / "gt.json", out / "gt", out / "pred.json", out / "pred"


# ------------------------------------------------------------------ tests


def test_prediction_equal_to_the_ground_truth_scores_one(panoptic_data, tmp_path):
    gt_json = panoptic_data / "annotations" / "panoptic_val.json"
    gt_dir = panoptic_data / "annotations" / "panoptic_val"
    shutil.copytree(gt_dir, tmp_path / "pred")
    res = pq_compute(gt_json, gt_dir, gt_json, tmp_path / "pred")
    assert res.images == 6 and res.summary["Things"]["n"] >= 3 and res.summary["Stuff"]["n"] == 2
    for k in ("All", "Things", "Stuff"):
        assert res.summary[k]["pq"] == res.summary[k]["sq"] == res.summary[k]["rq"] == 1.0
    assert reference_pq(gt_json, gt_dir, gt_json, tmp_path / "pred")["All"][:3] == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_pq_matches_the_definition_on_corrupted_predictions(panoptic_data, tmp_path, seed):
    files = _corrupt(panoptic_data, tmp_path, seed)
    res = pq_compute(*files)
    ref = reference_pq(*files)
    _assert_same(res, ref)
    assert 0.2 < res.summary["All"]["pq"] < 0.9  # neither trivial nor hopeless
    rows = res.per_class
    assert sum(r["fp"] for r in rows) > 0 and sum(r["fn"] for r in rows) > 0 and sum(r["tp"] for r in rows) > 0


def test_eval_panoptic_cli_scores_its_own_files(panoptic_data, tmp_path):
    """``ddetr eval --panoptic`` with a small mask-head model of the dataset's classes: the PQ it
    reports is the reference's on the files it wrote."""
    import torch

    from ddetr_cli.data.synth import CLASS_NAMES, STUFF_NAMES
    from ddetr_cli.models.build import build_model
    from ddetr_cli.models.config import ModelConfig
    from ddetr_cli.weights.load import save_model

    torch.manual_seed(0)
    names = CLASS_NAMES + STUFF_NAMES
    model = build_model(ModelConfig.from_variant("detr", masks=True, num_classes=len(names), class_names=names,
                                                 backbone_depth=18, d_model=64, nheads=8, enc_layers=1, dec_layers=1,
                                                 dim_feedforward=128, num_queries=12))
    with torch.no_grad():  # equal queries tie: the first takes the whole image (one segment)
        model.class_embed.weight.mul_(20)
        model.mask_head.out_lay.bias.add_(3.0)
        model.query_embed.weight.copy_(model.query_embed.weight[:1].expand_as(model.query_embed.weight))
    path = save_model(model, tmp_path / "m.safetensors")
    out = tmp_path / "ev"
    r = runner.invoke(app, ["eval", str(panoptic_data), "--panoptic", "--model", str(path), "--imgsz", "64",
                            "--panoptic-conf", "0.3", "--out", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["images"] == 6 and (out / "metrics.json").is_file()
    pred = json.loads((out / "panoptic.json").read_text())
    gt = json.loads((panoptic_data / "annotations" / "panoptic_val.json").read_text())
    assert sorted(a["image_id"] for a in pred["annotations"]) == sorted(a["image_id"] for a in gt["annotations"])
    assert sum(len(a["segments_info"]) for a in pred["annotations"]) >= 6
    ref = reference_pq(panoptic_data / "annotations" / "panoptic_val.json", panoptic_data / "annotations" / "panoptic_val",
                       out / "panoptic.json", out / "panoptic")
    for k in ("All", "Things", "Stuff"):
        for i, name in enumerate(("pq", "sq", "rq")):
            assert data["panoptic"][k][name] == pytest.approx(ref[k][i], abs=1e-6)
    # no panoptic split there: a non-zero exit
    r = runner.invoke(app, ["eval", str(tmp_path), "--panoptic", "--model", str(path)])
    assert r.exit_code != 0

"""Tracking from the command line: a model card's own thresholds as --track defaults, and
MOTChallenge sequence folders as sources and ground truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from ddetr_cli.cli.main import app
from ddetr_cli.data import synth
from ddetr_cli.weights.load import update_config


def run_json(*args: str) -> dict:
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{"):])


def data_section(p: Path) -> bytes:
    """A safetensors file's tensor bytes (after the 8-byte length and the JSON header)."""
    raw = p.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("clip")
    truth = synth.make_clip(d / "c.mp4", frames=8, size=(96, 64), fps=12, seed=1)
    (d / "c.json").write_text(json.dumps(synth.clip_json(truth, fps=12, size=(96, 64))))
    return d / "c.mp4", d / "c.json"


def test_model_card_thresholds_are_the_track_defaults(tmp_path: Path, tiny_model_path: Path, small_clip) -> None:
    clip, gt = small_clip
    carded = tmp_path / "carded.safetensors"
    shutil.copyfile(tiny_model_path, carded)
    update_config(carded, track_high=0.7, track_low=0.2)
    # only the metadata changed: the tensors are the same bytes
    assert data_section(carded) == data_section(tiny_model_path)
    a, b = load_file(str(carded)), load_file(str(tiny_model_path))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)

    info = run_json("weights", "info", str(carded))
    assert (info["track_high"], info["track_low"]) == (0.7, 0.2)

    def used(model: Path, *flags: str) -> tuple[float, float]:
        st = run_json("eval", str(clip), "--track", "--gt", str(gt), "--model", str(model), "--device", "cpu",
                      "--out", str(tmp_path / f"ev{len(list(tmp_path.iterdir()))}"), *flags)["settings"]
        return st["high"], st["low"]

    assert used(carded) == (0.7, 0.2)  # the card's
    assert used(tiny_model_path) == (0.5, 0.1)  # no card values: the defaults
    assert used(carded, "--track-high", "0.6") == (0.6, 0.2)  # a flag overrides the card
    assert used(carded, "--track-low", "0.05", "--track-high", "0.3") == (0.3, 0.05)
    # the card's high with a flag's low above it: one line, no traceback, no run
    r = CliRunner().invoke(app, ["eval", str(clip), "--track", "--gt", str(gt), "--model", str(carded), "--track-low", "0.8",
                                 "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "above the high one 0.7" in str(r.exception) and not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="track_low"):
        update_config(carded, track_high=0.3, track_low=0.4)
    assert data_section(carded) == data_section(tiny_model_path)  # a refused update leaves the file as it was


def test_demo_card_has_measured_thresholds() -> None:
    info = run_json("weights", "info", "demo")
    assert info["track_high"] is not None and info["track_low"] is not None
    assert 0 <= info["track_low"] <= info["track_high"] <= 1


@pytest.mark.slow
def test_mot_sequence_folder_tracks_and_scores_like_the_clip(tmp_path: Path) -> None:
    """``ddetr video SEQ/`` reads the sequence at its frame rate; ``ddetr eval SEQ/ --track`` scores
    against SEQ/gt/gt.txt and gives the numbers the same run gets against the clip's JSON truth."""
    seq = tmp_path / "SYN-02"
    truth = synth.make_mot_sequence(seq, frames=20, size=(320, 240), fps=10, seed=3, scene="occluder")
    clip_gt = tmp_path / "truth.json"
    clip_gt.write_text(json.dumps(synth.clip_json(truth, fps=10, size=(320, 240))))

    vid = run_json("video", str(seq), "--model", "demo", "--device", "cpu", "--out", str(tmp_path / "v"))
    assert vid["frames"] == 20 and vid["source_fps"] == 10.0 and (vid["width"], vid["height"]) == (320, 240)
    lines = [json.loads(x) for x in Path(vid["outputs"]["jsonl"]).read_text().splitlines()]
    assert [x["frame"] for x in lines] == list(range(20)) and [x["time"] for x in lines[:3]] == [0.0, 0.1, 0.2]

    ev = run_json("eval", str(seq), "--track", "--model", "demo", "--device", "cpu", "--out", str(tmp_path / "e"))
    assert ev["settings"]["gt"] == str(seq / "gt" / "gt.txt")
    m = ev["metrics"]
    assert m["objects"] == len({int(i) for t in truth for i in t["ids"]}) and m["frames"] == 20
    again = run_json("eval", str(tmp_path / "e" / "SYN-02.jsonl"), "--track", "--gt", str(clip_gt))["metrics"]
    assert again == m
    r = CliRunner().invoke(app, ["eval", str(tmp_path), "--track", "--model", "demo"])
    assert r.exit_code != 0 and "gt/gt.txt" in str(r.exception)

"""Fine-tuning: transforms, overfitting a batch, runs on the three dataset formats, exact resume
after SIGKILL and after Ctrl-C (SIGINT), a two-process gloo DDP run, one-line errors for bad input
and for a diverged run, the hooks' state in last.pt.

Everything runs on CPU with a tiny model (ResNet-18, d_model 64, 1+1 layers, 20 queries).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddetr_cli.data.datasets import load_dataset
from ddetr_cli.data.transforms import crop, hflip, resize_shape, scaled_sizes, train_transforms
from ddetr_cli.engine.trainer import (
    DistInfo,
    TrainSet,
    collate,
    epoch_batches,
    finetune,
    finetune_command,
    param_groups,
)
from ddetr_cli.files import RUN_MARKER
from ddetr_cli.models.config import ModelConfig
from ddetr_cli.models.deformable_detr import DeformableDETR
from ddetr_cli.models.losses import SetCriterion
from ddetr_cli.weights.load import load_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "data"
TINY = {"backbone_depth": 18, "d_model": 64, "nheads": 4, "enc_layers": 1, "dec_layers": 1,
        "num_queries": 20, "dim_feedforward": 128}
ARCH = [f"{k}={v}" for k, v in TINY.items()]
IMGSZ = 128
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = [str(data), "--scratch", "--imgsz", str(IMGSZ), "--batch", "2", "--workers", "0", "--out", str(out),
            "--no-register", "--quiet"]
    for a in ARCH:
        args += ["--arch", a]
    return args + list(extra)


# ------------------------------------------------------------------------------- transforms


def test_reference_sizes_at_800() -> None:
    s = scaled_sizes(800)
    assert s["scales"] == list(range(480, 801, 32)) and s["max_size"] == 1333
    assert s["crop_resize"] == [400, 500, 600] and (s["crop_min"], s["crop_max"]) == (384, 600)
    assert resize_shape(480, 640, 800, 1333) == (800, 1066)
    assert resize_shape(100, 1000, 800, 1333) == (133, 1330)


def test_flip_and_crop_boxes() -> None:
    img = np.zeros((20, 30, 3), np.uint8)
    boxes = np.array([[2, 3, 10, 8], [25, 15, 30, 20]], np.float32)
    labels = np.array([0, 1])
    _, fb, _ = hflip((img, boxes, labels))
    np.testing.assert_allclose(fb, [[20, 3, 28, 8], [0, 15, 5, 20]])
    ci, cb, cl = crop((img, boxes, labels), top=5, left=5, h=10, w=10)
    assert ci.shape == (10, 10, 3)
    np.testing.assert_allclose(cb, [[0, 0, 5, 3]])  # second box falls outside and is dropped
    assert cl.tolist() == [0]


def test_train_transform_keeps_boxes_inside_and_is_seeded() -> None:
    ds = load_dataset(EXAMPLES / "coco", "train")
    r = ds.records[0]
    tf = train_transforms(IMGSZ)
    a = tf((r.read(), r.boxes.copy(), r.labels.copy()), np.random.default_rng([0, 1, 2]))
    b = tf((r.read(), r.boxes.copy(), r.labels.copy()), np.random.default_rng([0, 1, 2]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    h, w = a[0].shape[:2]
    assert min(h, w) <= IMGSZ and len(a[1]) > 0
    assert (a[1][:, 0] >= 0).all() and (a[1][:, 2] <= w + 1e-3).all() and (a[1][:, 3] <= h + 1e-3).all()


def test_epoch_batches_shard_and_reshuffle() -> None:
    one = [i for b in epoch_batches(7, 2, 0, 0, DistInfo()) for i, _ in b]
    assert sorted(one) == list(range(7))
    shards = [[i for b in epoch_batches(7, 2, 0, 0, DistInfo(2, r, r)) for i, _ in b] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4 and set(shards[0] + shards[1]) == set(range(7))
    assert one != [i for b in epoch_batches(7, 2, 0, 1, DistInfo()) for i, _ in b]


# ------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_overfit_fixed_batch() -> None:
    torch.manual_seed(0)
    ds = load_dataset(EXAMPLES / "coco", "train")
    model = DeformableDETR(ModelConfig(num_classes=len(ds.class_names), **TINY)).train()
    images, mask, targets = collate([TrainSet(ds.records, IMGSZ, 0, train=False)[(i, 0)] for i in range(1)])
    crit = SetCriterion(model.cfg.num_classes)
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-4, 1e-4), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = crit(model(images, mask), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < min(losses[:3]), losses


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc"])
def test_finetune_each_format(fmt: str, tmp_path: Path) -> None:
    res = finetune(EXAMPLES / fmt, scratch=True, arch=ARCH, imgsz=IMGSZ, batch=2, epochs=1, max_steps=2,
                   workers=0, out=str(tmp_path), register=False, verbose=False)
    run = tmp_path / "exp"
    assert res.run_dir == run and res.finished
    umask = os.umask(0o022)
    os.umask(umask)
    for f in ("args.json", "last.pt", "last.safetensors", "best.safetensors", "results.csv", "progress.json"):
        assert (run / f).is_file(), f
        assert stat.S_IMODE((run / f).stat().st_mode) == 0o666 & ~umask, f  # not mkstemp's 0600
    assert not [p for p in run.glob(".*") if p.name != RUN_MARKER], "temporary files left behind"
    model = load_model(run / "best.safetensors")
    assert model.cfg.class_names == load_dataset(EXAMPLES / fmt, "train").class_names
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,steps,loss,cls,bbox,giou,lr,AP,AP50") and len(rows) == 2
    assert json.loads((run / "args.json").read_text())["imgsz"] == IMGSZ



def test_second_run_new_folder_and_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = pytest.importorskip("ddetr_cli.weights.store")
    monkeypatch.setenv("DDETR_HOME", str(tmp_path / "home"))
    (tmp_path / "runs" / "exp").mkdir(parents=True)  # an earlier run: never overwritten
    res = finetune(EXAMPLES / "coco", scratch=True, arch=ARCH, imgsz=IMGSZ, epochs=1, max_steps=1, workers=0,
                   out=str(tmp_path / "runs"), name="shapes-test", verbose=False)
    assert res.run_dir == tmp_path / "runs" / "exp2" and res.registered == "shapes-test"
    assert Path(registry.get("shapes-test").path) == res.best.resolve()


def test_pretrained_class_head_reinit(tmp_path: Path) -> None:
    """Start from a saved model with other classes: everything but the class head is kept."""
    from ddetr_cli.weights.load import save_model

    src = DeformableDETR(ModelConfig(num_classes=3, class_names=["a", "b", "c"], **TINY))
    path = save_model(src, tmp_path / "pre.safetensors")
    res = finetune(EXAMPLES / "coco", model=str(path), imgsz=IMGSZ, epochs=1, max_steps=1, workers=0, lr=1e-12,
                   lr_backbone=1e-12, ema=False, out=str(tmp_path / "runs"), register=False, verbose=False)
    got = load_model(res.last)
    assert got.cfg.num_classes == 5 and got.cfg.class_names[0] == "circle"
    a, b = src.state_dict(), got.state_dict()
    assert torch.allclose(a["transformer.level_embed"], b["transformer.level_embed"], atol=1e-6)
    assert b["class_embed.0.weight"].shape == (5, 64)


# ------------------------------------------------------------------------------- resume


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


EXACT = ("--epochs", "1", "--max-steps", "4")  # the runs the exactness tests compare


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """last.pt of a run of EXACT that nothing stopped (checkpoint periods do not change numbers)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    full = subprocess.run([sys.executable, "-m", "ddetr_cli", "finetune", *_cli_args(EXAMPLES / "coco", out, *EXACT)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    return _state(out / "exp" / "last.pt")


def _assert_same_run(a: dict, b: dict, k: int) -> None:
    """b was stopped at step k and resumed: from k on it equals the uninterrupted a."""
    assert b["resumed_from"] == [k] and b["finished"] and b["global_step"] == a["global_step"] == 4
    la, lb = dict(map(tuple, a["step_log"])), dict(map(tuple, b["step_log"]))
    for s in range(k + 1, 5):
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])
    for name, t in a["model"].items():
        assert torch.allclose(t, b["model"][name], atol=1e-5), name
    assert a["history"][-1]["AP"] == pytest.approx(b["history"][-1]["AP"], abs=1e-6)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path: Path, uninterrupted: dict) -> None:
    data = EXAMPLES / "coco"
    extra = (*EXACT, "--save-period", "2")
    proc = subprocess.Popen([sys.executable, "-m", "ddetr_cli", "finetune", *_cli_args(data, tmp_path / "b", *extra)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = tmp_path / "b" / "exp" / "progress.json"
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(progress.read_text())["global_step"]
        except (OSError, ValueError):
            step = 0
        if step >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _state(tmp_path / "b" / "exp" / "last.pt")
    assert not killed["finished"] and killed["global_step"] == 2

    resumed = subprocess.run([sys.executable, "-m", "ddetr_cli", "finetune", "--resume", str(tmp_path / "b" / "exp"), "--quiet"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, _state(tmp_path / "b" / "exp" / "last.pt"), killed["global_step"])

    again = subprocess.run([sys.executable, "-m", "ddetr_cli", "finetune", "--resume", str(tmp_path / "b" / "exp")],
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_in_first_epoch_saves_and_resume_is_exact(sig: int, tmp_path: Path, uninterrupted: dict) -> None:
    """Ctrl-C (SIGINT to the process group, data workers included) early in epoch 1, long before
    any periodic or epoch-end checkpoint: the run stops at the next step boundary, writes last.pt
    there and says so; --resume then ends with the uninterrupted run's weights. SIGTERM (what a
    scheduler sends a job before it kills it) does the same, exit code 143."""
    run = tmp_path / "exp"
    proc = subprocess.Popen([sys.executable, "-m", "ddetr_cli", "finetune",
                             *_cli_args(EXAMPLES / "coco", tmp_path, *EXACT, "--save-period", "0", "--workers", "1")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (run / "args.json").exists():
        time.sleep(0.01)
    time.sleep(0.5)  # args.json is written just before the first step
    assert proc.poll() is None, "training ended before it could be interrupted"
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    state = _state(run / "last.pt")
    k = state["global_step"]
    assert 1 <= k < 4 and state["epoch"] == 0 and state["step_in_epoch"] == k and not state["finished"]
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("stopping after")]
    assert lines == [f"interrupted at step {k}, saved: continue with ddetr finetune --resume {run}"], err
    assert not (run / "best.safetensors").exists() and not [p for p in run.glob(".*") if p.name != RUN_MARKER]

    resumed = subprocess.run([sys.executable, "-m", "ddetr_cli", "finetune", "--resume", str(run), "--quiet"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, _state(run / "last.pt"), k)


# ------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ddetr_cli", "finetune", *_cli_args(EXAMPLES / "coco", tmp_path, "--epochs", "1", "--max-steps", "2",
                                               "--save-period", "1")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "exp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # only rank 0 made a run folder
    state = _state(run / "last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["global_step"] == 2
    got = load_model(run / "best.safetensors").state_dict()
    ref = DeformableDETR(ModelConfig(num_classes=5, **TINY)).state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}


# ------------------------------------------------------------------------------- errors


def test_missing_dataset_cli_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ddetr_cli", "finetune", str(tmp_path / "nope"), "--scratch", "--out", str(tmp_path)],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "nope" in lines[0]


def _empty_coco(root: Path) -> Path:
    import cv2

    for split in ("train", "valid"):
        d = root / split
        d.mkdir(parents=True)
        cv2.imwrite(str(d / "a.png"), np.zeros((32, 32, 3), np.uint8))
        (d / "_annotations.coco.json").write_text(json.dumps({
            "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
            "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    return root


@pytest.mark.parametrize("case", ["no_boxes", "bad_option", "bad_arch", "bad_resume", "bad_model"])
def test_bad_input_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = EXAMPLES / "coco"
    kw: dict = {"scratch": True, "arch": ARCH, "out": str(tmp_path), "workers": 0, "quiet": True}
    if case == "no_boxes":
        data = _empty_coco(tmp_path / "empty")
    elif case == "bad_option":
        kw["batch"] = 0
    elif case == "bad_arch":
        kw["arch"] = ["d_model=abc"]
    elif case == "bad_resume":
        kw = {"resume": str(tmp_path / "missing"), "out": str(tmp_path)}
    elif case == "bad_model":
        (tmp_path / "junk.safetensors").write_bytes(b"not weights")
        kw = {"model": str(tmp_path / "junk.safetensors"), "out": str(tmp_path), "quiet": True}
    assert finetune_command(str(data), **kw) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err


def test_resume_with_larger_max_steps_continues(tmp_path: Path) -> None:
    """A run stopped by --max-steps is finished; resumed with a larger --max-steps it trains on
    from where it stopped (how the demo model's training is extended)."""
    kw = dict(scratch=True, arch=ARCH, imgsz=IMGSZ, batch=2, epochs=3, workers=0, out=str(tmp_path),
              register=False, verbose=False)
    first = finetune(EXAMPLES / "coco", max_steps=2, **kw)
    assert first.finished
    state = torch.load(first.run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert set(state) == STATE_KEYS
    del state["nonfinite_streak"]  # as written before the divergence guard: still resumes
    torch.save(state, first.run_dir / "last.pt")
    again = finetune(resume=str(first.run_dir), out=str(tmp_path), max_steps=2, verbose=False)
    assert again.finished
    state = torch.load(first.run_dir / "last.pt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    more = finetune(resume=str(first.run_dir), out=str(tmp_path), max_steps=4, verbose=False)
    assert more.finished
    state = torch.load(first.run_dir / "last.pt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4


def test_resume_with_more_epochs_and_later_lr_drop_equals_fresh_run(tmp_path: Path) -> None:
    """--epochs/--lr-drop given with --resume extend the schedule exactly: a 1-epoch run resumed
    to 2 epochs with the drop after epoch 1 ends with the same weights as a fresh 2-epoch run with
    that drop; a drop that would fall into epochs already trained is refused."""
    kw = dict(scratch=True, arch=ARCH, imgsz=IMGSZ, batch=4, workers=0, register=False, verbose=False, seed=3)
    fresh = finetune(EXAMPLES / "coco", epochs=2, lr_drop=1, out=str(tmp_path / "a"), **kw)
    short = finetune(EXAMPLES / "coco", epochs=1, lr_drop=5, out=str(tmp_path / "b"), **kw)
    assert short.finished
    longer = finetune(resume=str(short.run_dir), out=str(tmp_path / "b"), epochs=2, lr_drop=1, verbose=False)
    assert longer.finished
    a = torch.load(fresh.run_dir / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(short.run_dir / "last.pt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] > 0 and b["epoch"] == 2
    assert [r["lr"] for r in a["history"]] == [r["lr"] for r in b["history"]]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-5, msg=k)
    assert json.loads((short.run_dir / "args.json").read_text())["epochs"] == 2
    with pytest.raises(Exception, match="lr-drop 2 with --resume"):  # epoch 2 already ran at the dropped rate
        finetune(resume=str(short.run_dir), out=str(tmp_path / "b"), epochs=3, lr_drop=2, verbose=False)
    with pytest.raises(Exception, match="already trained 2"):
        finetune(resume=str(short.run_dir), out=str(tmp_path / "b"), epochs=1, verbose=False)


def test_validation_map_equals_ddetr_eval(tmp_path: Path) -> None:
    """The validation mAP that picks best.safetensors is the mAP `ddetr eval` reports for that
    checkpoint on the same split (one preprocessing, post-processing and COCOeval path). Starts
    from the bundled demo (same classes) with a vanishing learning rate, so the AP is far from 0."""
    from typer.testing import CliRunner

    from ddetr_cli.cli import app

    res = finetune(EXAMPLES / "coco", model="demo", imgsz=192, batch=2, epochs=1, max_steps=1, workers=0, lr=1e-12,
                   lr_backbone=1e-12, out=str(tmp_path / "runs"), register=False, verbose=False)
    header, row = (res.run_dir / "results.csv").read_text().strip().splitlines()
    val = dict(zip(header.split(","), row.split(",")))
    assert float(val["AP"]) > 0.3
    r = CliRunner().invoke(app, ["eval", str(EXAMPLES / "coco"), "--split", "valid", "--model", str(res.best), "--json",
                                 "--out", str(tmp_path / "eval"), "--quiet"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert abs(metrics["AP"] - float(val["AP"])) <= 1e-6 and abs(metrics["AP50"] - float(val["AP50"])) <= 1e-6


def test_finetune_flags_are_the_options_declared_once(tmp_path: Path) -> None:
    """`ddetr finetune`'s flags are built from FinetuneOptions: one flag per option with its help,
    nothing the API would reject; --json prints the run's result as plain JSON."""
    import dataclasses

    import typer
    from typer.testing import CliRunner

    from ddetr_cli.cli import app
    from ddetr_cli.engine.options import FinetuneOptions

    cmd = typer.main.get_command(app).commands["finetune"]
    names = {p.name for p in cmd.params}
    fields = {f.name: f for f in dataclasses.fields(FinetuneOptions) if "help" in f.metadata}
    assert names == set(fields) | {"data", "resume", "quiet", "as_json"}
    for p in cmd.params:
        if p.name in fields:
            assert fields[p.name].metadata["help"] in p.help
    r = CliRunner().invoke(app, ["finetune", str(EXAMPLES / "coco"), *_cli_args(EXAMPLES / "coco", tmp_path)[1:],
                                 "--epochs", "1", "--max-steps", "1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["run_dir"] == str(tmp_path / "exp") and Path(res["best"]).is_file() and res["epochs_done"] == 1


# ------------------------------------------------------------------------------- divergence


def test_diverged_run_fails_without_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    """--lr 1e6: the loss goes non-finite; after NONFINITE_LIMIT skipped steps in a row the run
    stops with one error line and exit 2, before any validation: no best.safetensors, nothing
    registered."""
    registry = pytest.importorskip("ddetr_cli.weights.store")
    monkeypatch.setenv("DDETR_HOME", str(tmp_path / "home"))
    code = finetune_command(str(EXAMPLES / "coco"), scratch=True, arch=ARCH, imgsz=IMGSZ, batch=2, epochs=2,
                            workers=0, lr=1e6, out=str(tmp_path / "runs"), name="diverged", quiet=True)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: training diverged") and "lower --lr" in err[0], err
    run = tmp_path / "runs" / "exp"
    assert not (run / "best.safetensors").exists() and not (run / "last.safetensors").exists()
    assert registry.get("diverged") is None
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True) if (run / "last.pt").exists() else None
    assert state is None or not state["finished"]
    from ddetr_cli.engine.trainer import NONFINITE_LIMIT

    assert NONFINITE_LIMIT < 8  # 8 steps per epoch here: the streak limit stopped it inside epoch 1


class _FakeTrainer:
    def __init__(self) -> None:
        self.global_step, self.step_finite, self.epoch_log = 0, True, {}

    def step(self, finite: bool) -> None:
        self.global_step += 1
        self.step_finite = finite


def test_nonfinite_guard_rules_and_state() -> None:
    from ddetr_cli.engine.train.hooks import NonFiniteGuard
    from ddetr_cli.engine.trainer import TrainingDiverged

    g, t = NonFiniteGuard(limit=3), _FakeTrainer()
    for finite in (False, False, True, False, False):  # a finite step resets the streak
        t.step(finite)
        g.after_step(t)
    assert g.streak == 2 and g.skipped == 4
    t.epoch_log = {"epoch": 1, "epoch_steps": 5}
    g.after_epoch(t)  # 2 of 5 steps non-finite: not a diverged epoch
    assert t.epoch_log["skipped"] == 4
    fresh = NonFiniteGuard(limit=3)
    fresh.load_state_dict(g.state_dict())  # resumed mid-streak: one more non-finite step stops it
    t.step(False)
    with pytest.raises(TrainingDiverged, match="steps 4-6"):
        fresh.after_step(t)
    g2 = NonFiniteGuard(limit=5)
    g2.load_state_dict({})  # a last.pt from before the guard: no streak
    t2 = _FakeTrainer()
    for _ in range(2):
        t2.step(False)
        g2.after_step(t2)
    t2.epoch_log = {"epoch": 1, "epoch_steps": 2}  # every step of the epoch non-finite
    with pytest.raises(TrainingDiverged, match="every step of epoch 1"):
        g2.after_epoch(t2)


# the keys of last.pt (format version 1); nonfinite_streak is the only one added since, and is
# optional on load
STATE_KEYS = {"format", "version", "options", "model_config", "model", "ema", "ema_updates", "optimizer",
              "scheduler", "scaler", "epoch", "step_in_epoch", "global_step", "best_ap", "best_epoch",
              "bad_epochs", "history", "step_log", "sums", "epoch_time", "finished", "stop_reason",
              "resumed_from", "rng", "world_size", "nonfinite_streak"}

"""Nothing lost, nothing silent: run folders are never mixed or shared, names are never silently
re-pointed, file-system failures are one line, a full disk keeps the last complete
predictions.json, Ctrl-C during start-up exits 130 quietly, and --help does not load torch.

These run the real `ddetr` entry point in subprocesses (the one-line error handling lives in it)
on real files; the full disk and the read-only folder are real tmpfs mounts (root only)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "examples" / "images"


def ddetr(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ddetr_cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.fixture
def tmpfs(tmp_path):
    """A real 400 KiB tmpfs, unmounted afterwards (needs root, as on the CI machine)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# ----------------------------------------------------------------------------- run folders


@pytest.mark.slow
def test_existing_out_is_refused_then_replaced_with_exist_ok(tmp_path):
    out = tmp_path / "run"
    args = ["detect", str(IMAGES / "shapes_0_320x240.jpg"), "--model", "demo", "--out", str(out), "--quiet"]
    assert ddetr(*args).returncode == 0
    first = json.loads((out / "predictions.json").read_text())
    r = ddetr("detect", str(IMAGES), "--model", "demo", "--out", str(out), "--quiet")
    assert r.returncode != 0 and "not empty" in one_error_line(r)
    assert json.loads((out / "predictions.json").read_text()) == first  # untouched
    r = ddetr("detect", str(IMAGES), "--model", "demo", "--out", str(out), "--quiet", "--exist-ok")
    assert r.returncode == 0, r.stderr
    pred = json.loads((out / "predictions.json").read_text())
    assert len(pred["images"]) == 6 and len(list((out / "annotated").iterdir())) == 6  # nothing of the first run
    # a folder that is not a ddetr run is never cleared
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    r = ddetr("detect", str(IMAGES), "--model", "demo", "--out", str(mine), "--exist-ok", "--quiet")
    assert r.returncode != 0 and "not a ddetr run folder" in one_error_line(r)
    assert (mine / "thesis.tex").read_text() == "precious"
    # --out naming a file
    r = ddetr("detect", str(IMAGES), "--model", "demo", "--out", str(mine / "thesis.tex"), "--quiet")
    assert r.returncode != 0 and "is a file" in one_error_line(r)


def test_two_processes_never_share_a_run_folder(tmp_path):
    from ddetr_cli.files import RunFolderError, claim_run_dir, next_run_dir

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time; from ddetr_cli.files import claim_run_dir; "
                              "claim_run_dir(sys.argv[1]); print('claimed', flush=True); time.sleep(60)",
                              str(tmp_path / "x")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert owner.stdout.readline().strip() == "claimed"
        with pytest.raises(RunFolderError):  # the claim is exclusive
            claim_run_dir(tmp_path / "x")
        with pytest.raises(RunFolderError, match="in use"):  # a live owner's folder is never cleared
            claim_run_dir(tmp_path / "x", exist_ok=True)
    finally:
        owner.kill()
        owner.wait()
    assert claim_run_dir(tmp_path / "x", exist_ok=True).is_dir()  # its owner has ended: replaceable
    # concurrent default folders: processes started together get distinct folders
    code = ("import sys; from pathlib import Path; from ddetr_cli.files import next_run_dir; "
            "print(next_run_dir(Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "runs")], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(4)]
    got = [p.communicate()[0].strip() for p in procs]
    assert len(set(got)) == 4, got
    assert next_run_dir(tmp_path / "runs").name == "exp5"


def test_failed_command_leaves_no_empty_run_folder(tmp_path):
    r = ddetr("detect", str(tmp_path / "nothing-here.jpg"), "--model", "demo", cwd=tmp_path)
    assert r.returncode != 0
    one_error_line(r)
    runs = tmp_path / "runs" / "detect"
    assert not runs.exists() or not any(runs.iterdir())


# ----------------------------------------------------------------------------- names


@pytest.mark.slow
def test_registered_names_are_not_silently_repointed(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DDETR_HOME", str(home))
    demo = ROOT / "weights" / "demo.safetensors"
    r = ddetr("weights", "import", str(demo), "--name", "mine")
    assert r.returncode == 0, r.stderr
    r = ddetr("weights", "import", str(demo), "--name", "mine")
    assert r.returncode != 0 and "already registered" in one_error_line(r)
    assert ddetr("weights", "import", str(demo), "--name", "mine", "--force").returncode == 0
    for bad in ("../x", "a/b", ".hidden"):
        r = ddetr("weights", "import", str(demo), "--name", bad)
        assert r.returncode != 0 and "invalid model name" in one_error_line(r)
    assert not (home / "x.safetensors").exists() and not (home / "models" / "a").exists()
    # default names never replace each other
    assert ddetr("weights", "import", str(demo)).returncode == 0
    assert ddetr("weights", "import", str(demo)).returncode == 0
    names = {e["name"] for e in json.loads(ddetr("weights", "list", "--json").stdout)}
    assert {"mine", "demo-2", "demo-3"} <= names  # "demo" itself is the bundled model


def test_finetune_name_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("DDETR_HOME", str(tmp_path / "home"))
    t0 = time.perf_counter()
    r = ddetr("finetune", str(ROOT / "examples" / "data" / "coco"), "--scratch", "--name", "a/b", "--out",
              str(tmp_path / "runs"))
    assert r.returncode == 2 and "invalid model name" in one_error_line(r)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert time.perf_counter() - t0 < 120  # refused up front, not after an epoch


# ----------------------------------------------------------------------------- file-system failures


def test_read_only_out_is_one_line(tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    r = ddetr("detect", str(IMAGES), "--model", "demo", "--out", str(tmpfs / "run"), "--quiet")
    assert r.returncode != 0
    assert "Read-only file system" in one_error_line(r)
    r = ddetr("detect", str(IMAGES), "--model", "demo", "--quiet", cwd=tmpfs)  # read-only working directory
    assert r.returncode != 0 and "Read-only file system" in one_error_line(r)
    data = ROOT / "examples" / "data" / "coco"
    for args in (["video", str(ROOT / "examples" / "clip.mp4"), "--model", "demo", "--out", str(tmpfs / "v")],
                 ["eval", str(data), "--split", "valid", "--model", "demo", "--out", str(tmpfs / "e")],
                 ["finetune", str(data), "--model", "demo", "--epochs", "1", "--out", str(tmpfs / "f")]):
        r = ddetr(*args)
        assert r.returncode != 0 and "Read-only file system" in one_error_line(r), args


@pytest.mark.slow
def test_full_disk_keeps_the_last_complete_predictions(tmpfs, tmp_path):
    # many copies of the example images: the annotated JPEGs fill the 400 KiB disk part-way
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(40):
        for p in IMAGES.glob("*.jpg"):
            shutil.copy(p, src / f"{i:02d}_{p.name}")
    out = tmpfs / "run"
    r = ddetr("detect", str(src), "--model", "demo", "--out", str(out), "--quiet", "--imgsz", "128")
    assert r.returncode != 0
    line = one_error_line(r)
    assert "No space left on device" in line or "cannot write" in line
    assert "stopped after" in line and "holds the first" in line
    pred = json.loads((out / "predictions.json").read_text())  # valid JSON, the last complete write
    held = int(line.rsplit("holds the first", 1)[1].split()[0])
    assert len(pred["images"]) == held < 240
    assert pred["info"]["incomplete"] is True


# ----------------------------------------------------------------------------- start-up


def _modules_after(args: list[str]) -> tuple[int, bool]:
    code = ("import sys, atexit\n"
            "atexit.register(lambda: sys.stderr.write('TORCH-LOADED\\n' if 'torch' in sys.modules else 'NO-TORCH\\n'))\n"
            f"sys.argv = ['ddetr', *{args!r}]\n"
            "from ddetr_cli.cli import main\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert "TORCH-LOADED" in r.stderr or "NO-TORCH" in r.stderr, r.stderr
    return r.returncode, "TORCH-LOADED" in r.stderr


@pytest.mark.parametrize("args", [["--help"], ["detect", "--help"], ["finetune", "--help"], ["video", "--help"],
                                  ["detect"], ["detect", "x.jpg", "--bogus"], ["eval", "--help"], ["serve", "--help"]])
def test_help_and_usage_errors_do_not_load_torch(args):
    code, torch_loaded = _modules_after(args)
    assert code in (0, 2) and not torch_loaded


def test_the_check_sees_torch_when_work_starts(tmp_path):
    code, torch_loaded = _modules_after(["detect", str(tmp_path / "missing.jpg"), "--model", "demo", "--out",
                                         str(tmp_path / "o")])
    assert code != 0 and torch_loaded


def test_ctrl_c_during_start_up_exits_130_quietly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.3, 1.0, 2.0):
        p = subprocess.Popen([sys.executable, "-m", "ddetr_cli", "detect", str(IMAGES), "--model", "demo", "--out",
                              str(tmp_path / f"o{delay}"), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        if p.returncode == 0:
            continue  # finished before the signal: nothing to check at this delay
        # 130, or killed by the signal itself when it lands before Python installs its handler
        # (a shell reports both as 130)
        assert p.returncode in (130, -signal.SIGINT), err
        assert "Traceback" not in err, err


def test_opencv_log_lines_do_not_leak_into_errors(tmp_path):
    r = ddetr("video", "cam7", "--model", "demo", "--out", str(tmp_path / "v"))
    assert r.returncode != 0 and "cannot open webcam" in one_error_line(r)
    assert "[ERROR" not in r.stderr and "[ WARN" not in r.stderr, r.stderr


def test_help_examples_name_files_a_run_writes():
    """The eval example's checkpoint path is where finetune puts it (run folder/best.safetensors,
    as tests/engine/test_trainer.py checks)."""
    r = ddetr("eval", "--help")
    assert "runs/finetune/exp/best.safetensors" in r.stdout
    assert "exp/weights/" not in r.stdout

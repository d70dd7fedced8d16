"""Shared fixtures: a tiny random model in the project's format, isolated caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TINY_CLASSES = ["circle", "square", "triangle", "cross", "ring"]


def tiny_config(**kw):
    from ddetr_cli.models.config import ModelConfig

    base = dict(
        num_classes=5, class_names=TINY_CLASSES, backbone_depth=18, d_model=64, nheads=4,
        enc_layers=1, dec_layers=1, dim_feedforward=128, num_queries=20,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A randomly initialised small multi-scale model saved in the project's own format."""
    from ddetr_cli.models.deformable_detr import DeformableDETR
    from ddetr_cli.weights.load import save_model

    torch.manual_seed(0)
    model = DeformableDETR(tiny_config())
    # a random model's class logits sit at the prior (-4.6): lift them so detections appear
    with torch.no_grad():
        for head in model.class_embed:
            head.bias.normal_(0.0, 1.0)
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_mask_model_path(tmp_path_factory) -> Path:
    """A randomly initialised small DETR with a mask head (``masks``), in the project's format; its
    class logits are spread so that detections (and masks) appear."""
    from ddetr_cli.models.build import build_model
    from ddetr_cli.models.config import ModelConfig
    from ddetr_cli.weights.load import save_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_variant(
        "detr", masks=True, num_classes=5, class_names=TINY_CLASSES, backbone_depth=18, d_model=64, nheads=8,
        enc_layers=1, dec_layers=1, dim_feedforward=128, num_queries=12))
    with torch.no_grad():
        model.class_embed.weight.mul_(20)
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny_detr_masks.safetensors")


@pytest.fixture
def start_serve(tmp_path):
    """Starts ``ddetr serve ARGS --port 0 --json`` (``python -m ddetr_cli``, env plus ``env``) and
    waits for it to listen -> (process, URL, stderr log file); stopped (SIGTERM, then SIGKILL) at
    teardown if still running."""
    import json
    import signal
    import subprocess
    import sys
    import threading
    import time

    procs = []

    def start(*args: str, env: dict[str, str] | None = None, timeout: float = 400.0):
        log = tmp_path / f"serve{len(procs)}.log"
        proc = subprocess.Popen([sys.executable, "-m", "ddetr_cli", "serve", *args, "--port", "0", "--json"],
                                stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True,
                                env={**os.environ, **(env or {})})
        procs.append(proc)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        t0 = time.monotonic()
        while True:
            try:
                return proc, json.loads("".join(lines))["url"], log
            except ValueError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                pytest.fail(f"ddetr serve did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def batch_sizes(monkeypatch):
    """spy(detector) -> a list that collects the number of images of each ``predict_arrays`` call."""

    def spy(det) -> list[int]:
        calls: list[int] = []
        forward = det.predict_arrays

        def counted(arrays, *a, **kw):
            calls.append(len(arrays))
            return forward(arrays, *a, **kw)

        monkeypatch.setattr(det, "predict_arrays", counted)
        return calls

    return spy


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Registry and converted weights go to a per-test folder, never the user's cache; the
    compiled op's build cache stays shared (building it is slow and tested in test_op)."""
    monkeypatch.setenv("DDETR_HOME", str(tmp_path / "ddetr_home"))
    if "DDETR_CACHE" in os.environ:
        monkeypatch.setenv("DDETR_CACHE", os.environ["DDETR_CACHE"])
    # Subprocesses (`python -m ddetr_cli ...`, some run from a temporary cwd) import the package
    # under test, not whatever copy is installed (an editable install may point at another checkout).
    root = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One real Label Studio server for the session (``labelstudio_server.py``); a missing install
    fails the tests that need it (the README's install step makes it)."""
    from labelstudio_server import StartError, executable, run_server

    if not os.access(executable(), os.X_OK):
        pytest.fail(f"no Label Studio at {executable()}: run README's install step (bash tests/install_tools.sh)")
    gen = run_server(tmp_path_factory.mktemp("label_studio"))
    try:
        server = next(gen)
    except StartError as e:
        pytest.fail(str(e))
    yield server
    gen.close()

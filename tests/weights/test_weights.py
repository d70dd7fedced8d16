"""`ddetr weights` (import/list/info/rm/pull) and CLI-level parity with transformers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import make_hf_model, save_hub, unresized_image
from PIL import Image
from typer.testing import CliRunner

from ddetr_cli.cli.main import app

runner = CliRunner()


def test_import_list_info_rm(tmp_path):
    hf = make_hf_model("box-refine")
    save_hub(hf, tmp_path / "hub")
    r = runner.invoke(app, ["weights", "import", str(tmp_path / "hub"), "--name", "mine"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["weights", "list", "--json"])
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    assert entries["mine"]["available"] and entries["mine"]["source"] == "import"
    assert "deformable-detr" in entries and not entries["deformable-detr"]["available"]
    r = runner.invoke(app, ["weights", "info", "mine"])
    assert r.exit_code == 0 and "box-refine" in r.stdout and "class3" in r.stdout
    # the imported copy is the project format and gives the same outputs
    from ddetr_cli.weights.load import detect_layout, load_model
    from ddetr_cli.weights.store import resolve

    assert detect_layout(resolve("mine")) == "ddetr"
    a, b = load_model(resolve("mine")), load_model(tmp_path / "hub")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(a(x)["logits"], b(x)["logits"])
    r = runner.invoke(app, ["weights", "rm", "mine"])
    assert r.exit_code == 0
    r = runner.invoke(app, ["weights", "list", "--json"])
    assert "mine" not in {e["name"] for e in json.loads(r.stdout)}


class _FakeHub(BaseHTTPRequestHandler):
    """The two endpoints huggingface-hub's snapshot_download uses: repo info and file resolve."""

    folder: Path
    repo: str
    sha = "0123456789abcdef0123456789abcdef01234567"
    requests: list[str] = []

    def log_message(self, *a):  # keep test output clean
        pass

    def _file(self):
        prefix = f"/{self.repo}/resolve/"
        if not self.path.startswith(prefix):
            return None
        name = self.path[len(prefix):].split("/", 1)[1]
        p = self.folder / name
        return p if p.is_file() else None

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith(f"/api/models/{self.repo}"):
            files = [{"rfilename": p.name} for p in sorted(self.folder.iterdir())]
            data = json.dumps({"id": self.repo, "sha": self.sha, "siblings": files}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._serve(body=True)

    def _serve(self, body: bool):
        p = self._file()
        if p is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = p.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", self.sha)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin-only"])
def test_pull_from_local_hub_then_offline(tmp_path, safetensors):
    """`ddetr weights pull` downloads through huggingface-hub from a hub server on 127.0.0.1
    (a repo with model.safetensors, or one with only pytorch_model.bin), converts once, and
    afterwards works offline."""
    hub = tmp_path / "served"
    hf = make_hf_model("multi-scale", num_labels=91)
    save_hub(hf, hub, safetensors=safetensors)
    assert (hub / "model.safetensors").is_file() == safetensors
    handler = type("H", (_FakeHub,), {"folder": hub, "repo": "SenseTime/deformable-detr", "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf"),
           "DDETR_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    try:
        p = subprocess.run([sys.executable, "-m", "ddetr_cli", "weights", "pull", "deformable-detr"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert any("/resolve/" in r for r in handler.requests)
    finally:
        server.shutdown()
    converted = tmp_path / "home" / "models" / "deformable-detr.safetensors"
    assert converted.is_file()
    # offline now, with the server gone: the default model resolves from the converted copy
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(img)
    env["HF_HUB_OFFLINE"] = "1"
    p = subprocess.run([sys.executable, "-m", "ddetr_cli", "detect", str(img), "--imgsz", "64", "--out", str(tmp_path / "o"),
                        "--json", "--no-save-images"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["images"] == 1


def test_cli_parity_with_transformers_postprocess(tmp_path):
    """A hub folder of a random transformers model given to --model gives transformers' own
    top detections on an image that needs no resize (short side 800)."""
    from transformers import DeformableDetrImageProcessor

    hf = make_hf_model("multi-scale", seed=5)
    with torch.no_grad():  # spread the scores so that a threshold keeps a meaningful set
        for head in hf.class_embed:
            head.bias.normal_(0.0, 1.5)
    save_hub(hf, tmp_path / "hub")
    img = unresized_image(tmp_path / "im.png")

    proc = DeformableDetrImageProcessor()
    inputs = proc(images=Image.open(img), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (800, 1000)
    with torch.no_grad():
        outputs = hf(**inputs)
    ref = proc.post_process_object_detection(outputs, threshold=0.3, target_sizes=[(800, 1000)], top_k=100)[0]
    assert len(ref["scores"]) >= 3

    r = runner.invoke(app, ["detect", str(img), "--model", str(tmp_path / "hub"), "--conf", "0.3", "--out",
                            str(tmp_path / "o"), "--no-save-images", "--quiet"])
    assert r.exit_code == 0, r.output
    pred = json.loads((tmp_path / "o" / "predictions.json").read_text())
    cat_to_label = {c["id"]: c["name"] for c in pred["categories"]}
    ours = sorted(((a["score"], cat_to_label[a["category_id"]], a["bbox"]) for a in pred["annotations"]), key=lambda t: -t[0])
    assert len(ours) == len(ref["scores"])
    for (score, name, (x, y, w, h)), rs, rl, rb in zip(ours, ref["scores"], ref["labels"], ref["boxes"]):
        assert abs(score - rs.item()) <= 1e-3
        assert name == hf.config.id2label[rl.item()]
        rb = rb.clamp(min=0).numpy()
        rb[[0, 2]] = rb[[0, 2]].clip(max=1000)
        rb[[1, 3]] = rb[[1, 3]].clip(max=800)
        assert np.abs(np.array([x, y, x + w, y + h]) - rb).max() <= 0.5

"""The wheel carries the op's C++/CUDA sources and the bundled demo model as package data, and an
install from it finds them (``ddetr_cli.assets``), without installing anything: the wheel is built
from a copy of the checkout and unpacked into a folder that a child process imports from."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from ddetr_cli.assets import ASSETS, asset_dir

REPO = Path(__file__).resolve().parents[1]
# what a checkout holds that the build must not see (outputs, caches, other builds)
_NOT_SOURCES = (".git", "build", "dist", "runs", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", ".whl", ".gl")


def _shipped(folder: str) -> list[str]:
    """Names of the checkout's files in ``folder`` that the wheel must carry."""
    return sorted(
        f.name for f in (REPO / folder).iterdir() if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in ASSETS[folder])
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [whl] = (tmp / "dist").glob("ddetr_cli-*.whl")
    return whl


def test_checkout_lookup_falls_back_to_top_level_folders():
    # this test runs from the checkout (editable install or PYTHONPATH): nothing is installed
    assert asset_dir("csrc") == REPO / "csrc"
    assert asset_dir("weights") == REPO / "weights"
    with pytest.raises(ValueError, match="unknown asset"):
        asset_dir("examples")


def test_wheel_carries_sources_and_demo_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    csrc = _shipped("csrc")
    assert {"ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp", "ms_deform_attn_cuda.cu"} <= set(csrc)
    for name in csrc:
        assert f"ddetr_cli/assets/csrc/{name}" in names
    for name in ("demo.safetensors", "demo.md"):
        assert f"ddetr_cli/assets/weights/{name}" in names
    assets = sorted(n for n in names if n.startswith("ddetr_cli/assets/") and not n.endswith("__init__.py"))
    # only the bundled models and their cards: not the training scripts
    assert not [n for n in assets if n.endswith((".sh", ".py"))], assets
    assert not [n for n in names if n.startswith(("csrc/", "weights/", "tests/", "examples/"))]
    with zipfile.ZipFile(wheel) as z:
        assert z.read("ddetr_cli/assets/weights/demo.safetensors") == (REPO / "weights" / "demo.safetensors").read_bytes()
        assert z.read("ddetr_cli/assets/csrc/ms_deform_attn.cpp") == (REPO / "csrc" / "ms_deform_attn.cpp").read_bytes()


def test_unpacked_wheel_finds_its_own_sources_and_demo(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = textwrap.dedent(
        """
        import json
        import ddetr_cli
        from ddetr_cli.ops import msda
        from ddetr_cli.weights import store
        print(json.dumps({
            "package": ddetr_cli.__file__,
            "csrc": str(msda.CSRC_DIR),
            "sources": [str(s) for s in msda._sources(True) if s.is_file()],
            "weights": str(store.WEIGHTS_DIR),
            "demo": str(store.resolve("demo")),
            "cache": str(msda.extension_cache_dir()),
        }))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(site), DDETR_HOME=str(tmp_path / "home"), DDETR_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    pkg = site / "ddetr_cli"
    assert got["package"] == str(pkg / "__init__.py")  # the unpacked wheel, not the checkout
    assert got["csrc"] == str(pkg / "assets" / "csrc")
    assert len(got["sources"]) == 3 and all(s.startswith(str(pkg / "assets" / "csrc")) for s in got["sources"])
    assert got["weights"] == str(pkg / "assets" / "weights")
    assert got["demo"] == str(pkg / "assets" / "weights" / "demo.safetensors")
    assert not got["cache"].startswith(str(site))  # the op is built in the cache, never beside the sources

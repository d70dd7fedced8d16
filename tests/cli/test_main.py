"""The command line's shape: every command has --json (plain JSON on stdout)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from ddetr_cli.cli import app


def _leaves(cmd, path: str = "ddetr"):
    if hasattr(cmd, "commands"):  # a group
        for name, sub in cmd.commands.items():
            yield from _leaves(sub, f"{path} {name}")
    else:
        yield path, cmd


def test_every_command_has_json():
    leaves = dict(_leaves(typer.main.get_command(app)))
    assert {"ddetr detect", "ddetr video", "ddetr eval", "ddetr finetune", "ddetr info", "ddetr weights list",
            "ddetr weights pull", "ddetr weights import", "ddetr weights rm", "ddetr weights info", "ddetr serve"} <= set(leaves)
    missing = [p for p, c in leaves.items() if "--json" not in {o for prm in c.params for o in prm.opts}]
    assert not missing, missing


def test_weights_info_json_lists_the_label_table():
    r = CliRunner().invoke(app, ["weights", "info", "demo", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert [c["name"] for c in info["categories"]] == ["circle", "square", "triangle", "cross", "ring"]
    assert [c["id"] for c in info["categories"]] == [1, 2, 3, 4, 5] and info["imgsz"] == 256


@pytest.mark.slow
def test_cli_lets_idle_openmp_threads_sleep_unless_the_user_chose(tmp_path):
    """The ``ddetr`` entry point (``ddetr_cli.__main__``) sets OMP_WAIT_POLICY=PASSIVE before
    torch loads OpenMP (spinning threads stall a shared CPU), and leaves a user's own
    OMP_WAIT_POLICY / GOMP_SPINCOUNT alone."""
    import os
    import subprocess
    import sys

    probe = ("import sys, os, ddetr_cli.__main__; import torch; "
             "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")

    def policy(**env) -> str:
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**base, **env}, timeout=300,
                           cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()[0]

    assert policy() == "PASSIVE"
    assert policy(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert policy(GOMP_SPINCOUNT="1000") == "None"
    # the entry point itself imports nothing heavy: torch is not loaded before the policy is set
    r = subprocess.run([sys.executable, "-c", "import sys, ddetr_cli.__main__; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "False", r.stderr

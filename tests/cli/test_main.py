"""The command line's shape: every command has --json (plain JSON on stdout)."""

from __future__ import annotations

import json

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

"""The code passes the linter configured in pyproject.toml (ruff: pycodestyle, pyflakes, import
order, 140 columns)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes():
    # ruff comes with the dev extra (pip install -e '.[dev]'); run the one installed beside pytest
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

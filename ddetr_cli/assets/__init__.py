"""Where the files that ship beside the code are: the op's C++/CUDA sources and the bundled models.

They live in the checkout's top-level ``csrc/`` and ``weights/`` folders; a wheel carries them as
package data in this package (``ddetr_cli/assets/csrc``, ``ddetr_cli/assets/weights``: copied there
by ``setup.py`` at build time). :func:`asset_dir` returns the installed copy when there is one,
else the checkout's folder (a source tree or an editable install).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS", "asset_dir"]

# name -> (what the wheel holds of the checkout's top-level folder of that name)
ASSETS: dict[str, tuple[str, ...]] = {
    "csrc": ("*.cpp", "*.cu", "*.h", "*.cuh"),
    "weights": ("*.safetensors", "*.md"),
}

_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parents[1]


def asset_dir(name: str) -> Path:
    """The folder holding the ``name`` assets (``csrc`` or ``weights``): the installed package
    data first, else the checkout's top-level folder (which may not exist)."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset folder {name!r}; known: {', '.join(ASSETS)}")
    installed = _HERE / name
    return installed if installed.is_dir() else _CHECKOUT / name

"""Ships the top-level ``csrc/`` sources and the bundled models in ``weights/`` inside the package.

Everything else is in pyproject.toml. Package data must live inside a package, and these folders
stay at the top of the checkout, so ``build_py`` copies them (the patterns in
``ddetr_cli/assets``'s ``ASSETS``) into ``ddetr_cli/assets/<folder>`` of the build tree, where
``ddetr_cli.assets.asset_dir`` finds them after a regular install. Editable installs skip the copy
and read the checkout's folders.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _assets() -> dict:
    spec = importlib.util.spec_from_file_location("_ddetr_assets", ROOT / "ddetr_cli" / "assets" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ASSETS


class BuildPyWithAssets(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, patterns in _assets().items():
            files = sorted({f for p in patterns for f in (ROOT / folder).glob(p) if f.is_file()})
            if not files:
                raise SystemExit(f"setup.py: no {' '.join(patterns)} files in {ROOT / folder}")
            dest = Path(self.build_lib) / "ddetr_cli" / "assets" / folder
            shutil.rmtree(dest, ignore_errors=True)  # no stale files from an earlier build
            dest.mkdir(parents=True)
            for f in files:
                self.copy_file(str(f), str(dest / f.name))


setup(cmdclass={"build_py": BuildPyWithAssets})

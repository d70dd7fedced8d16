"""ddetr: Deformable DETR object detection from the command line.

Importing the package is cheap and never builds the compiled op; the public API loads lazily::

    from ddetr_cli import Detector
    det = Detector.from_pretrained("demo")
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Detector", "DeformableDETR", "ModelConfig", "load_model", "save_model", "__version__"]


def __getattr__(name: str):
    if name == "Detector":
        from .detector import Detector

        return Detector
    if name == "DeformableDETR":
        from .model import DeformableDETR

        return DeformableDETR
    if name == "ModelConfig":
        from .config import ModelConfig

        return ModelConfig
    if name in ("load_model", "save_model"):
        from . import weights

        return getattr(weights, name)
    raise AttributeError(name)

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
        from ddetr_cli.engine.predictor import Detector

        return Detector
    if name == "DeformableDETR":
        from ddetr_cli.models.deformable_detr import DeformableDETR

        return DeformableDETR
    if name == "ModelConfig":
        from ddetr_cli.models.config import ModelConfig

        return ModelConfig
    if name in ("load_model", "save_model"):
        from ddetr_cli.weights import load

        return getattr(load, name)
    raise AttributeError(name)

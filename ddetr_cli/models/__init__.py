"""The networks: Deformable DETR and DETR, their backbones, shared layers, losses, matcher, the
inference-time fusion, and the configuration dataclass that describes them."""

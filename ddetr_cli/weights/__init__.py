"""Weights: checkpoint layouts (transformers hub, official ``.pth``, this project's
``.safetensors``), strict loading, and the store of named weights."""

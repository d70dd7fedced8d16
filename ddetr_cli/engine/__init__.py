"""The work: prediction (``Detector``), ``detect`` over folders, the video pipeline, training
and evaluation."""

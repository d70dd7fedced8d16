"""The multi-scale deformable attention op: dispatch between the compiled C++/CUDA kernels
(sources in the top-level ``csrc/``, shipped in wheels as ``ddetr_cli/assets/csrc``) and the
pure-PyTorch reference, and the op's build."""

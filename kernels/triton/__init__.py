"""Triton kernels of the misa ops (see docs/kernels.md). They become the ops' CUDA
implementations when a CUDA device and Triton are both present; elsewhere importing this package
does nothing (the CPU tests import the kernel modules directly, under TRITON_INTERPRET=1)."""
import importlib.util

import torch

if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    from . import register  # noqa: F401

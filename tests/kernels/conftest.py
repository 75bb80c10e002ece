"""Kernel tests run the Triton kernels in Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET is read when triton is imported, so it is set here, before any test
module imports a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

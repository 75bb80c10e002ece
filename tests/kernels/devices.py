"""Where the Triton kernel tests put their inputs: the GPU when there is one (compiled kernels), else the CPU
(Triton's interpreter, see conftest.py)."""

import torch

TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

IS_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton's CPU interpreter multiplies bfloat16 operands as their raw uint16 bits, so `mma`
# widens them to float32 there; compiled kernels keep the tensor-core path.
_UPCAST_DOT = tl.constexpr(IS_INTERPRETER)


@triton.jit
def mma(a, b, acc):
    """`acc + a @ b` with a float32 accumulator; float32 operands stay exact (no TF32)."""
    if _UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def next_pow2(n: int, floor: int = 1) -> int:
    """Smallest power of two >= max(n, floor): Triton block shapes must be powers of two."""
    return max(triton.next_power_of_2(max(int(n), 1)), floor)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 under the interpreter, so small tests still split."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count

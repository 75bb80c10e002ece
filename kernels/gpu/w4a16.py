"""Triton W4A16 GEMM: int4 weights are unpacked and scaled in registers, next to the fp16/bf16 MMA.

Weight bytes are a quarter of fp16's, which is what matters at small batch, where the GEMM
is memory-bound. Split-K spreads a skinny GEMM's few output tiles over more programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gpu.common import IS_INTERPRETER, mma, next_pow2, num_sms


@triton.jit
def _w4a16_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    m_size,
    n_size,
    k_size,
    group_size,
    k_per_split,
    stride_xm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_GROUP_PER_TILE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < m_size
    n_mask = n < n_size
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_size, k_start + k_per_split)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_stop
        a = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        # Eight consecutive K rows share one int32; each row shifts out its own nibble.
        packed = tl.load(qweight_ptr + (k // 8)[:, None] * n_size + n[None, :], mask=w_mask, other=0)
        codes = (packed >> ((k % 8) * 4)[:, None]) & 0xF
        if ONE_GROUP_PER_TILE:
            scale = tl.load(scales_ptr + (k0 // group_size) * n_size + n, mask=n_mask, other=0.0)[None, :]
        else:
            scale = tl.load(scales_ptr + (k // group_size)[:, None] * n_size + n[None, :], mask=w_mask, other=0.0)
        w = ((codes - 8).to(tl.float32) * scale.to(tl.float32)).to(a.dtype)
        acc = mma(a, w, acc)
    if HAS_BIAS:
        # Only the first split adds the bias, so split-K sums it once.
        bias = tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]
    dst = out_ptr + m[:, None] * stride_om + n[None, :]
    if IS_SPLIT:
        tl.atomic_add(dst, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def choose_split_k(m_tiles: int, n_tiles: int, k_tiles: int, device: torch.device) -> int:
    """Enough K splits to give every SM a program when the output grid alone cannot."""
    if device.type != "cuda":
        return 1
    return max(1, min(num_sms(device) // max(m_tiles * n_tiles, 1), k_tiles // 4, 16))


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.quant.w4a16_matmul`; x's last dim must be contiguous."""
    lead = x.shape[:-1]
    k_size = x.shape[-1]
    x2 = x.reshape(-1, k_size)
    m_size, n_size = x2.shape[0], qweight.shape[1]
    if m_size == 0:
        return torch.empty(*lead, n_size, dtype=x.dtype, device=x.device)
    block_m = 16 if IS_INTERPRETER or m_size <= 16 else (32 if m_size <= 32 else 64)
    block_n = 32 if IS_INTERPRETER else 128
    block_k = min(next_pow2(group_size), 32 if IS_INTERPRETER else 128)
    m_tiles, n_tiles, k_tiles = triton.cdiv(m_size, block_m), triton.cdiv(n_size, block_n), triton.cdiv(k_size, block_k)
    if split_k is None:
        split_k = choose_split_k(m_tiles, n_tiles, k_tiles, x.device)
    # Split boundaries stay on K-tile boundaries, so a tile never straddles two splits.
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    is_split = split_k > 1
    out = torch.zeros if is_split else torch.empty
    out = out(m_size, n_size, dtype=torch.float32 if is_split else x.dtype, device=x.device)
    _w4a16_kernel[(m_tiles, n_tiles, split_k)](
        x2,
        qweight,
        scales,
        out if bias is None else bias,
        out,
        m_size,
        n_size,
        k_size,
        group_size,
        k_per_split,
        x2.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ONE_GROUP_PER_TILE=group_size % block_k == 0,
        HAS_BIAS=bias is not None,
        IS_SPLIT=is_split,
    )
    return out.to(x.dtype).view(*lead, n_size) if is_split else out.view(*lead, n_size)

"""Triton W4A16 GEMM: int4 weights are unpacked and scaled in registers, next to the fp16/bf16 MMA.

Weight bytes are a quarter of fp16's, which is what matters at small batch, where the GEMM
is memory-bound. Each packed int32 is loaded once (a `[BLOCK_K // 8, BLOCK_N]` tile) and
unpacked in registers; when a K tile lies inside one quantisation group, the dot runs on the
raw codes and the group's scale is applied once to the partial sum. Split-K spreads a skinny
GEMM's few output tiles over enough programs to keep every SM's memory pipe busy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gpu.common import IS_INTERPRETER, mma, next_pow2, num_sms

# The CPU interpreter turns int32 into bfloat16 wrongly (NaNs); there the codes go through float32 first.
_CODES_VIA_F32 = tl.constexpr(IS_INTERPRETER)

CVT, MAGIC = 0, 1
"""Dequantisation modes: a plain int-to-float convert (a quarter-rate instruction on Hopper), or the
"magic number" trick (OR the nibble into the mantissa of 1024.0 / 128.0, subtract 1032 / 136)."""


@triton.jit
def _dequant(nibbles, dtype: tl.constexpr, MODE: tl.constexpr):
    """`nibbles` (int32 in [0, 15]) minus 8, in `dtype`, exactly."""
    if MODE == 1 and dtype == tl.float16:
        return (nibbles | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
    elif MODE == 1 and dtype == tl.bfloat16:
        return (nibbles | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0
    elif _CODES_VIA_F32:
        return (nibbles - 8).to(tl.float32).to(dtype)
    else:
        return (nibbles - 8).to(dtype)


@triton.jit
def _nibble_dot(part, x_ptr, m, m_mask, stride_xm, rows, rows_mask, w_j, j: tl.constexpr):
    """`part + x[:, 8 * rows + j] @ w_j`: the dot of nibble j's K rows (x's columns at stride 8)."""
    a_j = tl.load(
        x_ptr + m[:, None] * stride_xm + (rows * 8 + j)[None, :],
        mask=m_mask[:, None] & rows_mask[None, :],
        other=0.0,
    )
    return mma(a_j, w_j, part)


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
    SCALE_AFTER_DOT: tl.constexpr,
    SPLIT_DOTS: tl.constexpr,
    DEQUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_SPLIT: tl.constexpr,
):
    PACKED_K: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < m_size
    n_mask = n < n_size
    kp = tl.arange(0, PACKED_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_size, k_start + k_per_split)
    for k0 in range(k_start, k_stop, BLOCK_K):
        # K is a multiple of 8 and so is every tile start: a packed row is wholly in or out.
        rows = k0 // 8 + kp
        rows_mask = rows * 8 < k_stop
        packed = tl.load(
            qweight_ptr + rows[:, None].to(tl.int64) * n_size + n[None, :],
            mask=rows_mask[:, None] & n_mask[None, :],
            other=0,
        )
        if SPLIT_DOTS:
            # Nibble j of packed row i is K offset 8 * i + j: one dot per nibble, over x's stride-8 columns.
            part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            x_dtype = x_ptr.dtype.element_ty
            w0 = _dequant(packed & 0xF, x_dtype, DEQUANT)
            w1 = _dequant((packed >> 4) & 0xF, x_dtype, DEQUANT)
            w2 = _dequant((packed >> 8) & 0xF, x_dtype, DEQUANT)
            w3 = _dequant((packed >> 12) & 0xF, x_dtype, DEQUANT)
            w4 = _dequant((packed >> 16) & 0xF, x_dtype, DEQUANT)
            w5 = _dequant((packed >> 20) & 0xF, x_dtype, DEQUANT)
            w6 = _dequant((packed >> 24) & 0xF, x_dtype, DEQUANT)
            w7 = _dequant((packed >> 28) & 0xF, x_dtype, DEQUANT)
            part = _nibble_dot(part, x_ptr, m, m_mask, stride_xm, rows, rows_mask, w0, 0)
            part = _nibble_dot(part, x_ptr, m, m_mask, stride_xm, rows, rows_mask, w1, 1)
            part = _nibble_dot(part, x_ptr, m, m_mask, stride_xm, rows, rows_mask, w2, 2)
            part = _nibble_dot(part, x_ptr, m, m_mask, stride_xm, rows, rows_mask, w3, 3)
            part = _nibble_dot(part, x_ptr, m, m_mask, stride_xm, rows, rows_mask, w4, 4)
            part = _nibble_dot(part, x_ptr, m, m_mask, stride_xm, rows, rows_mask, w5, 5)
            part = _nibble_dot(part, x_ptr, m, m_mask, stride_xm, rows, rows_mask, w6, 6)
            part = _nibble_dot(part, x_ptr, m, m_mask, stride_xm, rows, rows_mask, w7, 7)
            scale = tl.load(scales_ptr + (k0 // group_size) * n_size + n, mask=n_mask, other=0.0)
            acc += part * scale.to(tl.float32)[None, :]
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_stop
            a = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            shifts = tl.arange(0, 8) * 4
            codes = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, [BLOCK_K, BLOCK_N])
            if SCALE_AFTER_DOT:
                # The whole tile is one group: integer codes are exact in any float type, scale the sum once.
                part = mma(a, _dequant(codes, a.dtype, DEQUANT), tl.zeros([BLOCK_M, BLOCK_N], tl.float32))
                scale = tl.load(scales_ptr + (k0 // group_size) * n_size + n, mask=n_mask, other=0.0)
                acc += part * scale.to(tl.float32)[None, :]
            else:
                scale = tl.load(
                    scales_ptr + (k // group_size)[:, None] * n_size + n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = mma(a, ((codes - 8).to(tl.float32) * scale.to(tl.float32)).to(a.dtype), acc)
    if HAS_BIAS:
        # Only the first split adds the bias, so split-K sums it once.
        bias = tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]
    dst = out_ptr + m[:, None] * stride_om + n[None, :]
    if IS_SPLIT:
        tl.atomic_add(dst, acc, mask=m_mask[:, None] & n_mask[None, :], sem="relaxed")
    else:
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def choose_config(m_size: int, n_size: int, k_size: int, group_size: int) -> dict:
    """Tile shape, dequantisation, warps and pipeline depth (swept on an H100 at Llama-3-8B sizes).

    Up to 16 rows: one dot per nibble on magic-number codes (no reshape of the unpacked tile, no
    int-to-float converts); past that the MMA work dominates and the reshaped tile does better.
    """
    if IS_INTERPRETER:
        block_k = min(next_pow2(group_size, 16), 32)
        return {"block_m": 16, "block_n": 32, "block_k": block_k, "num_warps": 4, "num_stages": 1, "programs_per_sm": 4}
    block_k = 128 if group_size % 128 == 0 else min(next_pow2(group_size, 16), 128)
    if m_size <= 16:
        cfg = {
            "block_m": 16,
            "block_n": 128,
            "num_warps": 4,
            "split_dots": True,
            "dequant": MAGIC,
            "programs_per_sm": 4,
        }
    else:
        block_m = 32 if m_size <= 32 else 64
        cfg = {"block_m": block_m, "block_n": 64, "num_warps": 8, "dequant": CVT, "programs_per_sm": 1.5}
    return {**cfg, "block_k": block_k, "num_stages": 4}


def choose_split_k(m_tiles: int, n_tiles: int, k_tiles: int, device: torch.device, programs_per_sm: float = 4) -> int:
    """Enough K splits for about `programs_per_sm` programs per SM when the output grid alone cannot give them."""
    if device.type != "cuda":
        return 1
    want = int(programs_per_sm * num_sms(device))
    return max(1, min(-(-want // max(m_tiles * n_tiles, 1)), k_tiles // 2, 16))


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.quant.w4a16_matmul`; x's last dim must be contiguous.

    `config` (tuning) overrides `choose_config`'s keys, plus `split_dots` (one dot per nibble) and
    `dequant` (CVT or MAGIC).
    """
    lead = x.shape[:-1]
    k_size = x.shape[-1]
    x2 = x.reshape(-1, k_size)
    m_size, n_size = x2.shape[0], qweight.shape[1]
    if m_size == 0:
        return torch.empty(*lead, n_size, dtype=x.dtype, device=x.device)
    cfg = {**choose_config(m_size, n_size, k_size, group_size), **(config or {})}
    block_m, block_n, block_k = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    m_tiles, n_tiles, k_tiles = triton.cdiv(m_size, block_m), triton.cdiv(n_size, block_n), triton.cdiv(k_size, block_k)
    if split_k is None:
        split_k = choose_split_k(m_tiles, n_tiles, k_tiles, x.device, cfg["programs_per_sm"])
    # Split boundaries stay on K-tile boundaries, so a tile never straddles two splits.
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(k_tiles, k_per_split // block_k)
    is_split = split_k > 1
    scale_after_dot = group_size % block_k == 0
    split_dots = bool(cfg.get("split_dots", False)) and scale_after_dot and block_k >= 128
    dequant = cfg.get("dequant", MAGIC)
    if IS_INTERPRETER or x.dtype == torch.float32:
        dequant = CVT  # no bit tricks for float32; the interpreter's bfloat16 bit casts are wrong
    out = torch.zeros if is_split else torch.empty
    out = out(m_size, n_size, dtype=torch.float32 if is_split else x.dtype, device=x.device)
    _w4a16_kernel[(n_tiles, m_tiles, split_k)](
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
        SCALE_AFTER_DOT=scale_after_dot,
        SPLIT_DOTS=split_dots,
        DEQUANT=dequant,
        HAS_BIAS=bias is not None,
        IS_SPLIT=is_split,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out.to(x.dtype).view(*lead, n_size) if is_split else out.view(*lead, n_size)

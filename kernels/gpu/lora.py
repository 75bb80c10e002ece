"""Triton multi-LoRA: BGMV (per-token GEMVs) up to `BGMV_MAX_TOKENS`, SGMV (adapter-sorted tiles) past it.

Both run as shrink (`x @ A.T` into a `[T, max_rank]` buffer) then expand (`buffer @ B.T`
added into y). Ranks below the max are zero-padded in A and B, so they cost nothing extra
in correctness, only in the padded FLOPs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gpu.common import IS_INTERPRETER, next_pow2
from kernels.gpu.grouped_gemm import align_block_size, grouped_gemm

# Up to this many tokens per-token GEMVs (split over K for the shrink) beat sorting and padding
# tiles: on an H100 (hidden 4096, rank 16, 8 adapters) BGMV took 8 us at 64 tokens and 22 us at
# 512, SGMV 83 and 112 us, most of it the adapter sort.
BGMV_MAX_TOKENS = 512


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    slots_ptr,
    rank,
    k_size,
    stride_xm,
    stride_wg,
    stride_wr,
    stride_om,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per (token, K chunk): a decode batch still fills the GPU, and the fp32 partial
    # sums of the chunks meet in `out` by atomic adds.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        r = tl.arange(0, BLOCK_R)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        r_mask = r < rank
        k_mask = k < k_size
        a = tl.load(x_ptr + token * stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + slot * stride_wg + r[:, None] * stride_wr + k[None, :],
            mask=r_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        tl.atomic_add(out_ptr + token * stride_om + r, tl.sum(w * a[None, :], 1), mask=r_mask, sem="relaxed")


@triton.jit
def _bgmv_expand_kernel(
    buf_ptr,
    w_ptr,
    y_ptr,
    slots_ptr,
    n_size,
    rank,
    stride_bm,
    stride_wg,
    stride_wn,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        n_mask = n < n_size
        r_mask = r < rank
        b = tl.load(buf_ptr + token * stride_bm + r, mask=r_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + slot * stride_wg + n[:, None] * stride_wn + r[None, :],
            mask=n_mask[:, None] & r_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        dst = y_ptr + token * stride_ym + n
        acc = tl.sum(w * b[None, :], 1) + tl.load(dst, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def _bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`[T, R]` float32 shrink result (zeros for rows without an adapter)."""
    rank, k_size = lora_a.shape[1], lora_a.shape[2]
    out = torch.zeros(x.shape[0], rank, dtype=torch.float32, device=x.device)
    block_k = min(next_pow2(k_size, 16), 32 if IS_INTERPRETER else 256)
    _bgmv_shrink_kernel[(x.shape[0], triton.cdiv(k_size, block_k))](
        x,
        lora_a,
        out,
        slots,
        rank,
        k_size,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        out.stride(0),
        BLOCK_R=next_pow2(rank),
        BLOCK_K=block_k,
    )
    return out


def _bgmv_expand(y: torch.Tensor, buffer: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor) -> None:
    n_size, rank = lora_b.shape[1], lora_b.shape[2]
    block_n = min(next_pow2(n_size, 16), 16 if IS_INTERPRETER else 256)
    _bgmv_expand_kernel[(y.shape[0], triton.cdiv(n_size, block_n))](
        buffer,
        lora_b,
        y,
        slots,
        n_size,
        rank,
        buffer.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        y.stride(0),
        BLOCK_N=block_n,
        BLOCK_R=next_pow2(rank),
    )


def _sorted_tiles(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    block_m = 16 if IS_INTERPRETER else 32
    sorted_ids, block_slots = align_block_size(slots, num_slots, block_m)
    return sorted_ids, block_slots, block_m


def _pick_mode(num_tokens: int, mode: str | None) -> str:
    return mode or ("bgmv" if num_tokens <= BGMV_MAX_TOKENS else "sgmv")


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    slots: torch.Tensor,
    *,
    mode: str | None = None,
    tiles: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.lora.lora_shrink`. `mode` is `sgmv`, `bgmv` or None (by token count)."""
    if _pick_mode(x.shape[0], mode) == "bgmv" and x.shape[0]:
        return _bgmv_shrink(x, lora_a, slots).to(x.dtype)
    buffer = torch.zeros(x.shape[0], lora_a.shape[1], dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return buffer
    sorted_ids, block_slots, block_m = tiles or _sorted_tiles(slots, lora_a.shape[0])
    grouped_gemm(x, lora_a, buffer, sorted_ids, block_slots, block_m=block_m, n_size=lora_a.shape[1])
    return buffer


def lora_expand(
    y: torch.Tensor,
    buffer: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    *,
    mode: str | None = None,
    tiles: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> None:
    """Same contract as `kernels.lora.lora_expand` (adds into y in place)."""
    if y.shape[0] == 0:
        return
    if _pick_mode(y.shape[0], mode) == "bgmv":
        _bgmv_expand(y, buffer, lora_b, slots)
        return
    sorted_ids, block_slots, block_m = tiles or _sorted_tiles(slots, lora_b.shape[0])
    grouped_gemm(buffer, lora_b, y, sorted_ids, block_slots, block_m=block_m, n_size=lora_b.shape[1], accumulate=True)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    *,
    mode: str | None = None,
) -> None:
    """Same contract as `kernels.lora.add_lora`: shrink then expand, sharing one adapter sort."""
    mode = _pick_mode(x.shape[0], mode)
    if mode == "bgmv":
        if x.shape[0]:
            # The float32 buffer goes straight to the expand: no rounding of the rank-R activations.
            _bgmv_expand(y, _bgmv_shrink(x, lora_a, slots), lora_b, slots)
        return
    tiles = _sorted_tiles(slots, lora_a.shape[0]) if x.shape[0] else None
    buffer = lora_shrink(x, lora_a, slots, mode=mode, tiles=tiles)
    lora_expand(y, buffer, lora_b, slots, mode=mode, tiles=tiles)

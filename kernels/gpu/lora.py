"""Triton multi-LoRA: SGMV (adapter-sorted tiles, tensor cores) for prefill, BGMV (one token per program) for decode.

Both run as shrink (`x @ A.T` into a `[T, max_rank]` buffer) then expand (`buffer @ B.T`
added into y). Ranks below the max are zero-padded in A and B, so they cost nothing extra
in correctness, only in the padded FLOPs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gpu.common import IS_INTERPRETER, next_pow2
from kernels.gpu.grouped_gemm import grouped_gemm
from kernels.moe import align_block_size

# Up to this many tokens a step is decode-like: per-token GEMVs beat sorting and padding tiles.
BGMV_MAX_TOKENS = 32


@triton.jit
def _bgmv_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    slots_ptr,
    n_size,
    k_size,
    stride_am,
    stride_wg,
    stride_wn,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < n_size
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, k_size, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_size
            a = tl.load(a_ptr + token * stride_am + k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + slot * stride_wg + n[:, None] * stride_wn + k[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w * a[None, :], 1)
        dst = out_ptr + token * stride_om + n
        if ACCUMULATE:
            acc += tl.load(dst, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def _bgmv(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, *, accumulate: bool) -> None:
    n_size, k_size = w.shape[1], w.shape[2]
    block_n = min(next_pow2(n_size), 16 if IS_INTERPRETER else 64)
    block_k = min(next_pow2(k_size), 16 if IS_INTERPRETER else 128)
    _bgmv_kernel[(a.shape[0], triton.cdiv(n_size, block_n))](
        a,
        w,
        out,
        slots,
        n_size,
        k_size,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ACCUMULATE=accumulate,
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
    buffer = torch.zeros(x.shape[0], lora_a.shape[1], dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return buffer
    if _pick_mode(x.shape[0], mode) == "bgmv":
        _bgmv(x, lora_a, buffer, slots, accumulate=False)
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
        _bgmv(buffer, lora_b, y, slots, accumulate=True)
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
    tiles = _sorted_tiles(slots, lora_a.shape[0]) if mode == "sgmv" and x.shape[0] else None
    buffer = lora_shrink(x, lora_a, slots, mode=mode, tiles=tiles)
    lora_expand(y, buffer, lora_b, slots, mode=mode, tiles=tiles)

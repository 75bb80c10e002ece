"""Triton RMSNorm (with fused residual add) and rotary embedding (rotate-half layout)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gpu.common import next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    num_features,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_features
    offs = row * num_features + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the input dtype before normalising, as the reference does.
        res = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + res).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + offs, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / num_features + eps)
    normed = (h * inv_rms).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (normed.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.norm.rms_norm`; rows are normalised one program each."""
    num_features = x.shape[-1]
    flat = x.reshape(-1, num_features).contiguous()
    out = torch.empty(flat.shape, dtype=torch.result_type(weight, x), device=x.device)
    res_in = flat if residual is None else residual.reshape(-1, num_features).contiguous()
    res_out = torch.empty_like(flat) if residual is not None else flat
    if flat.shape[0]:
        _rms_norm_kernel[(flat.shape[0],)](
            flat,
            res_in,
            weight,
            out,
            res_out,
            num_features,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=next_pow2(num_features),
        )
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


@triton.jit
def _rotary_kernel(
    x_ptr,
    out_ptr,
    positions_ptr,
    cache_ptr,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    num_heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    heads = tl.arange(0, BLOCK_H)
    col_mask = cols < half
    cos = tl.load(cache_ptr + pos * 2 * half + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * 2 * half + half + cols, mask=col_mask, other=0.0).to(tl.float32)
    mask = (heads[:, None] < num_heads) & col_mask[None, :]
    src = x_ptr + token * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * stride_ot + heads[:, None] * stride_oh + cols[None, :]
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos[None, :] + x1 * sin[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.result_type(x, cache), device=x.device)
    num_tokens, num_heads, head_dim = x.shape
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            x,
            out,
            positions,
            cache,
            x.stride(0),
            x.stride(1),
            out.stride(0),
            out.stride(1),
            num_heads,
            head_dim // 2,
            BLOCK_H=next_pow2(num_heads),
            BLOCK_HALF=next_pow2(head_dim // 2),
        )
    return out


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.rotary.apply_rotary`; the head-dim axes must be contiguous."""
    cache = cos_sin_cache.contiguous()
    return _rotate(query, positions, cache), _rotate(key, positions, cache)

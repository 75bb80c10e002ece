"""Triton KV cache write: scatter each new token's K/V into its slot of the paged pool."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gpu.common import next_pow2


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ch,
    stride_cb,
    stride_cs,
    block_size,
    head_dim,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    # A negative slot marks a padding token that owns no cache entry.
    if slot >= 0:
        dims = tl.arange(0, BLOCK_D)
        mask = dims < head_dim
        block = slot // block_size
        offset = slot % block_size
        dst = head * stride_ch + block * stride_cb + offset * stride_cs + dims
        k = tl.load(key_ptr + token * stride_kt + head * stride_kh + dims, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + head * stride_vh + dims, mask=mask)
        tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as `kernels.attention.write_kv_cache`; the head-dim axes must be contiguous."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        key_cache.shape[2],
        head_dim,
        BLOCK_D=next_pow2(head_dim),
    )

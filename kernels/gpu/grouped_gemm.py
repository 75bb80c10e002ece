"""One grouped GEMM for every "rows sorted by group, each group its own weight" product.

Fused MoE (gate/up with SiLU-and-multiply, then down with the routing weights) and SGMV
LoRA (shrink then expand) are the same kernel: a tile of `BLOCK_M` rows that all belong to
one group (an expert or an adapter) multiplies that group's weight. `align_block_size`
(kernels/moe.py) builds the row order and the group of each tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gpu.common import IS_INTERPRETER, mma, next_pow2


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    sorted_ids_ptr,
    block_groups_ptr,
    row_weights_ptr,
    num_rows,
    n_size,
    k_size,
    a_row_div,
    up_offset,
    stride_am,
    stride_ak,
    stride_wg,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SILU_MUL: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.load(block_groups_ptr + pid_m).to(tl.int64)
    # Tiles past the padded total (or of no group) carry no rows.
    if group >= 0:
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < num_rows
        a_rows = rows // a_row_div
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < n_size
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, k_size, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_size
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_am + k[None, :] * stride_ak,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w_tile = w_ptr + group * stride_wg + n[None, :] * stride_wn + k[:, None] * stride_wk
            w_mask = k_mask[:, None] & n_mask[None, :]
            acc = mma(a, tl.load(w_tile, mask=w_mask, other=0.0), acc)
            if SILU_MUL:
                acc_up = mma(a, tl.load(w_tile + up_offset * stride_wn, mask=w_mask, other=0.0), acc_up)
        if SILU_MUL:
            acc = acc * tl.sigmoid(acc) * acc_up
        if SCALE_ROWS:
            acc = acc * tl.load(row_weights_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        out_tile = out_ptr + rows[:, None] * stride_om + n[None, :] * stride_on
        out_mask = row_mask[:, None] & n_mask[None, :]
        if ACCUMULATE:
            acc = acc + tl.load(out_tile, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_groups: torch.Tensor,
    *,
    block_m: int,
    n_size: int,
    a_row_div: int = 1,
    silu_mul: bool = False,
    row_weights: torch.Tensor | None = None,
    accumulate: bool = False,
) -> None:
    """`out[r, :n] (+)= epilogue(a[r // a_row_div] @ w[g].T)` for every row r of every tile of group g.

    `w` is `[G, N_total, K]`; with `silu_mul`, columns `[0, n)` are the gate and `[n, 2n)` the up
    projection and the result is `silu(gate) * up`. `row_weights [num_rows]` scales each row.
    """
    k_size = w.shape[2]
    num_rows = out.shape[0]
    block_n = 16 if IS_INTERPRETER else 64
    block_k = 16 if IS_INTERPRETER else 64
    grid = (block_groups.shape[0], triton.cdiv(n_size, block_n))
    _grouped_gemm_kernel[grid](
        a,
        w,
        out,
        sorted_ids,
        block_groups,
        out if row_weights is None else row_weights,
        num_rows,
        n_size,
        k_size,
        a_row_div,
        n_size,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=min(block_k, next_pow2(k_size, 16)),
        SILU_MUL=silu_mul,
        SCALE_ROWS=row_weights is not None,
        ACCUMULATE=accumulate,
    )

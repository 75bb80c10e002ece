"""One grouped GEMM for every "rows sorted by group, each group its own weight" product.

Fused MoE (gate/up with SiLU-and-multiply, then down with the routing weights) and SGMV
LoRA (shrink then expand) are the same kernel: a tile of `BLOCK_M` rows that all belong to
one group (an expert or an adapter) multiplies that group's weight. `align_block_size`
(here, without a host sync, so the whole op captures in a CUDA graph) builds the row order and
the group of each tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gpu.common import IS_INTERPRETER, mma, next_pow2


def align_block_size(group_ids: torch.Tensor, num_groups: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.moe.align_block_size`, with no device-to-host read.

    The reference's `torch.bincount` reads the largest id back to size its output, a sync
    that rules out CUDA-graph capture; here the counts come from a fixed-size scatter-add and
    the placement from a scatter. Ids outside `[0, num_groups)` are dropped like negative ones.
    """
    ids = group_ids.reshape(-1).to(torch.int64)
    num_items = ids.numel()
    device = ids.device
    keys = torch.where((ids >= 0) & (ids < num_groups), ids, num_groups)
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    padded = (counts + block_size - 1) // block_size * block_size
    # zero_() on a view, not `padded[i] = 0`: that copies a CPU scalar, which a CUDA graph cannot capture.
    padded[num_groups:].zero_()
    group_ends = torch.cumsum(padded, 0)
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    rank_in_group = torch.arange(num_items, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_keys]
    capacity = -(-(num_items + num_groups * (block_size - 1)) // block_size) * block_size
    dest = torch.where(sorted_keys < num_groups, (group_ends - padded)[sorted_keys] + rank_in_group, capacity)
    sorted_ids = torch.full((capacity + 1,), num_items, dtype=torch.int64, device=device)
    sorted_ids.scatter_(0, dest, order)
    block_starts = torch.arange(0, capacity, block_size, device=device)
    block_groups = torch.searchsorted(group_ends[:num_groups].contiguous(), block_starts, right=True)
    block_groups = torch.where(block_groups < num_groups, block_groups, -1)
    return sorted_ids[:capacity], block_groups


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
    k_per_split,
    a_row_div,
    out_row_div,
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
    ATOMIC_OUT: tl.constexpr,
):
    # Tiles along N vary fastest, so the programs running together share the tile's rows of `a`.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
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
        k_start = split * k_per_split
        k_stop = tl.minimum(k_size, k_start + k_per_split)
        for k0 in range(k_start, k_stop, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_stop
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
        out_mask = row_mask[:, None] & n_mask[None, :]
        if ATOMIC_OUT:
            # Split-K partial sums, and rows that share an output row (a token's top-k experts), meet here.
            out_tile = out_ptr + (rows // out_row_div)[:, None] * stride_om + n[None, :] * stride_on
            tl.atomic_add(out_tile, acc, mask=out_mask, sem="relaxed")
        else:
            out_tile = out_ptr + rows[:, None] * stride_om + n[None, :] * stride_on
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
    atomic_out: bool = False,
    out_row_div: int = 1,
    split_k: int = 1,
    config: dict | None = None,
) -> None:
    """`out[r, :n] (+)= epilogue(a[r // a_row_div] @ w[g].T)` for every row r of every tile of group g.

    `w` is `[G, N_total, K]`; with `silu_mul`, columns `[0, n)` are the gate and `[n, 2n)` the up
    projection and the result is `silu(gate) * up`. `row_weights [num_rows]` scales each row.
    With `atomic_out`, `out` is float32 and row r is atomically added into `out[r // out_row_div]`,
    which also allows `split_k` > 1 (K split over that many programs). `config` overrides the
    tile (`block_n`, `block_k`) and launch (`num_warps`, `num_stages`) choices.
    """
    if split_k > 1 and not atomic_out:
        raise ValueError("split_k > 1 needs atomic_out")
    if atomic_out and (silu_mul or accumulate or out.dtype != torch.float32):
        raise ValueError("atomic_out adds float32 partial sums: no silu_mul or accumulate, a float32 out")
    k_size = w.shape[2]
    num_rows = a.shape[0] * a_row_div
    cfg = {"block_n": 16 if IS_INTERPRETER else 64, "block_k": 16 if IS_INTERPRETER else 64, **(config or {})}
    block_k = min(cfg["block_k"], next_pow2(k_size, 16))
    k_tiles = triton.cdiv(k_size, block_k)
    k_per_split = triton.cdiv(k_tiles, max(1, split_k)) * block_k
    launch = {key: cfg[key] for key in ("num_warps", "num_stages") if key in cfg}
    grid = (triton.cdiv(n_size, cfg["block_n"]), block_groups.shape[0], triton.cdiv(k_size, k_per_split))
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
        k_per_split,
        a_row_div,
        out_row_div,
        n_size,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=cfg["block_n"],
        BLOCK_K=block_k,
        SILU_MUL=silu_mul,
        SCALE_ROWS=row_weights is not None,
        ACCUMULATE=accumulate,
        ATOMIC_OUT=atomic_out,
        **launch,
    )

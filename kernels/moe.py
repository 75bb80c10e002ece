"""Grouped-expert MoE reference: sort (token, k) pairs by expert, one matmul per expert segment."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, `[num_experts]` int64."""
    return torch.bincount(topk_ids.flatten(), minlength=num_experts)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """`sum_k w_k * down_e(silu(gate_e(x)) * up_e(x))` for x `[T, H]`, w_gate_up `[E, 2I, H]`, w_down `[E, H, I]`."""
    top_k = topk_ids.shape[1]
    intermediate = w_down.shape[2]
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    sorted_x = x.index_select(0, token_of)
    out_sorted = torch.empty_like(sorted_x)
    start = 0
    # One GEMM per expert over its contiguous segment; the loop is over experts, never tokens.
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        seg = sorted_x[start : start + count]
        gate_up = seg @ w_gate_up[expert].t()
        act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        out_sorted[start : start + count] = act @ w_down[expert].t()
        start += count
    weights = topk_weights.flatten()[order].to(out_sorted.dtype)
    out = torch.zeros_like(x)
    out.index_add_(0, token_of, out_sorted * weights[:, None])
    return out


def align_block_size(group_ids: torch.Tensor, num_groups: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort items by group and pad every group to a multiple of `block_size` rows.

    `group_ids [N]` (an expert per (token, k) pair, or an adapter per token; negative means
    "no group", and the item is dropped). Returns `sorted_ids [P]`, item indices in group
    order with `N` in the padding, and `block_groups [P // block_size]`, the group of each
    block of rows or -1 past the end. P is an upper bound known without reading the device,
    so the grouped GEMM launches without a host sync.
    """
    ids = group_ids.reshape(-1).to(torch.int64)
    num_items = ids.numel()
    device = ids.device
    # Dropped items get the extra key `num_groups`, which sorts last and lands in a spare slot.
    keys = torch.where(ids >= 0, ids, num_groups)
    counts = torch.bincount(keys, minlength=num_groups + 1)
    padded = (counts + block_size - 1) // block_size * block_size
    padded[num_groups] = 0
    group_ends = torch.cumsum(padded, 0)
    group_starts = group_ends - padded
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    rank_in_group = torch.arange(num_items, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_keys]
    capacity = -(-(num_items + num_groups * (block_size - 1)) // block_size) * block_size
    dest = torch.where(sorted_keys < num_groups, group_starts[sorted_keys] + rank_in_group, capacity)
    sorted_ids = torch.full((capacity + 1,), num_items, dtype=torch.int64, device=device)
    sorted_ids[dest] = order
    block_starts = torch.arange(0, capacity, block_size, device=device)
    block_groups = torch.searchsorted(group_ends[:num_groups].contiguous(), block_starts, right=True)
    block_groups = torch.where(block_groups < num_groups, block_groups, -1)
    return sorted_ids[:capacity], block_groups

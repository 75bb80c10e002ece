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

"""Triton fused MoE: align (token, k) pairs to experts, then gate/up+SiLU*mul and down+routing weights."""

from __future__ import annotations

import torch

from kernels.gpu.common import IS_INTERPRETER, next_pow2
from kernels.gpu.grouped_gemm import grouped_gemm
from kernels.moe import align_block_size


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: about one expert's share of the pairs, so small batches waste little padding."""
    if IS_INTERPRETER:
        return 16
    return min(max(next_pow2(-(-num_pairs // num_experts)), 16), 64)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `kernels.moe.fused_moe`."""
    num_tokens, hidden = x.shape
    num_experts, _, _ = w_gate_up.shape
    intermediate = w_down.shape[2]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(x)
    block_m = choose_block_m(num_pairs, num_experts)
    sorted_ids, block_experts = align_block_size(topk_ids.flatten(), num_experts, block_m)
    act = torch.empty(num_pairs, intermediate, dtype=x.dtype, device=x.device)
    # Pair p = token * top_k + k reads token p // top_k, so x is never copied per expert.
    grouped_gemm(
        x,
        w_gate_up,
        act,
        sorted_ids,
        block_experts,
        block_m=block_m,
        n_size=intermediate,
        a_row_div=top_k,
        silu_mul=True,
    )
    per_pair = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32)
    grouped_gemm(act, w_down, per_pair, sorted_ids, block_experts, block_m=block_m, n_size=hidden, row_weights=weights)
    if top_k == 1:
        return per_pair
    return per_pair.view(num_tokens, top_k, hidden).sum(1)

"""Triton fused MoE: align (token, k) pairs to experts, then gate/up+SiLU*mul and down+routing weights."""

from __future__ import annotations

import torch

from kernels.gpu.common import IS_INTERPRETER, next_pow2, num_sms
from kernels.gpu.grouped_gemm import align_block_size, grouped_gemm


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: about one expert's share of the pairs, so small batches waste little padding."""
    if IS_INTERPRETER:
        return 16
    return min(max(next_pow2(-(-num_pairs // num_experts)), 16), 64)


def choose_down_split(num_pairs: int, num_experts: int, block_m: int, n_tiles: int, k_tiles: int) -> int:
    """K splits for the down projection: a decode batch has few (expert, N) tiles, too few programs
    to keep the memory pipes busy while streaming the experts' weights."""
    if IS_INTERPRETER:
        return min(2, k_tiles)
    # Tiles that carry rows, at most: each used expert rounds its pairs up to whole tiles.
    busy_tiles = min(num_pairs, num_experts) + num_pairs // block_m
    want = 8 * num_sms(torch.device("cuda"))
    return max(1, min(-(-want // (busy_tiles * n_tiles)), k_tiles // 4, 16))


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.moe.fused_moe`. `config` (tuning): `gate_up` / `down` grouped-GEMM
    configs and `down_split`."""
    config = config or {}
    # Tiles swept on an H100 at Mixtral sizes (batch 1 and 64): K tiles of 128 stream the weights best.
    tile = {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3}
    if IS_INTERPRETER:
        tile = {"block_n": 16, "block_k": 16}
    num_tokens, hidden = x.shape
    num_experts, _, _ = w_gate_up.shape
    intermediate = w_down.shape[2]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(x)
    block_m = choose_block_m(num_pairs, num_experts)
    # No host sync from here on: the op captures in a CUDA graph.
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
        config={**tile, **(config.get("gate_up") or {})},
    )
    down_cfg = {**tile, **(config.get("down") or {})}
    split = config.get("down_split") or choose_down_split(
        num_pairs,
        num_experts,
        block_m,
        -(-hidden // down_cfg["block_n"]),
        -(-intermediate // min(down_cfg["block_k"], next_pow2(intermediate, 16))),
    )
    # Each pair's routing-weighted row is added straight into its token's float32 row: split-K
    # partial sums and the top-k sum meet there, with no per-pair buffer.
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32)
    grouped_gemm(
        act,
        w_down,
        out,
        sorted_ids,
        block_experts,
        block_m=block_m,
        n_size=hidden,
        row_weights=weights,
        atomic_out=True,
        out_row_div=top_k,
        split_k=split,
        config=down_cfg,
    )
    return out.to(x.dtype)

"""Sparse MoE blocks: Mixtral's and Qwen2-MoE's routers, with experts computed grouped by `ops.fused_moe`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from workers.engine.config import ModelConfig
from workers.engine.models.layers import DenseMLP


def route_topk(router_logits: torch.Tensor, top_k: int, *, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in float32, keep the top-k, optionally renormalise them to sum to 1."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    """Routed experts stored stacked: `w_gate_up [E, 2I, H]` (gate rows first) and `w_down [E, H, I]`.

    Mixtral always renormalises the top-k weights; Qwen2-MoE does when `norm_topk_prob`
    and adds a shared expert scaled by a sigmoid gate.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        num_experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob or config.architecture == "MixtralForCausalLM"
        # Qwen2-MoE casts the routing weights back to the activation dtype; Mixtral keeps float32.
        self.cast_weights = config.architecture == "Qwen2MoeForCausalLM"
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)
        self.shared_expert: DenseMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(hidden, config.shared_expert_intermediate_size, lora_ctx=None)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_topk(self.gate(x), self.top_k, normalize=self.normalize)
        if self.cast_weights:
            weights = weights.to(x.dtype)
        self.expert_counts += ops.moe_expert_counts(ids, self.expert_counts.shape[0])
        out = ops.fused_moe(x, self.w_gate_up, self.w_down, weights, ids)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

"""Sparse-MoE decoders: Mixtral and Qwen2-MoE, with experts computed grouped by `ops.fused_moe`.

Routing follows transformers exactly: softmax over all experts in float32, top-k, then
renormalise the k weights (Mixtral always; Qwen2-MoE when `norm_topk_prob`). Qwen2-MoE
casts the weights back to the activation dtype and adds a shared expert behind a sigmoid gate.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from workers.engine.config import ModelConfig
from workers.engine.lora_layers import LoRAContext
from workers.engine.models.layers import Attention, DenseMLP
from workers.engine.models.llama import LlamaForCausalLM, WeightTarget

# Per-expert keys as published checkpoints (and transformers' save_pretrained) store them.
_MIXTRAL_EXPERT = re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_QWEN2_MOE_EXPERT = re.compile(r"(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
# transformers 5's in-memory layout, already stacked like ours (gate rows first).
_FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_EXPERT_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def route_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 routing weights `[T, k]` and expert ids `[T, k]`: softmax over all experts, keep the top k."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    """Router plus routed experts stored stacked: `w_gate_up [E, 2I, H]` (gate rows first), `w_down [E, H, I]`.

    Routed experts are not LoRA targets; the optional shared expert is a dense MLP and is.
    `expert_counts [E]` accumulates how many (token, k) routes each expert has served.
    """

    def __init__(
        self,
        config: ModelConfig,
        lora_ctx: LoRAContext,
        *,
        renormalize: bool,
        weights_in_activation_dtype: bool,
        has_shared_expert: bool,
    ) -> None:
        super().__init__()
        num_experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        if not 0 < config.num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok={config.num_experts_per_tok} must be in [1, {num_experts}]")
        self.top_k = config.num_experts_per_tok
        self.renormalize = renormalize
        self.weights_in_activation_dtype = weights_in_activation_dtype
        self.gate = nn.utils.skip_init(nn.Linear, hidden, num_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)
        self.shared_expert: DenseMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if has_shared_expert:
            self.shared_expert = DenseMLP(hidden, config.shared_expert_intermediate_size, lora_ctx)
            self.shared_expert_gate = nn.utils.skip_init(nn.Linear, hidden, 1, bias=False)
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_topk(self.gate(x), self.top_k, renormalize=self.renormalize)
        if self.weights_in_activation_dtype:
            weights = weights.to(x.dtype)
        self.expert_counts += ops.moe_expert_counts(ids, self.expert_counts.shape[0])
        out = ops.fused_moe(x, self.w_gate_up, self.w_down, weights, ids)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class _MoEForCausalLM(LlamaForCausalLM):
    """What both MoE models add to the dense base: expert statistics and per-expert checkpoint keys."""

    _expert_key: re.Pattern[str]

    def expert_counts(self) -> dict[int, list[int]]:
        """Routes each expert has served since load (or the last reset), keyed by MoE layer index."""
        return {i: layer.mlp.expert_counts.tolist() for i, layer in self._moe_layers()}

    def reset_expert_counts(self) -> None:
        for _, layer in self._moe_layers():
            layer.mlp.expert_counts.zero_()

    def _moe_layers(self):
        return ((i, layer) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, SparseMoE))

    def _weight_target(self, name: str) -> WeightTarget:
        match = self._expert_key.fullmatch(name)
        if match:
            prefix, expert, part = match.group(1), int(match.group(2)), _EXPERT_PART[match.group(3)]
            inter = self.config.moe_intermediate_size
            if part == "down":
                return f"{prefix}.mlp.w_down", (expert, slice(None))
            rows = slice(0, inter) if part == "gate" else slice(inter, 2 * inter)
            return f"{prefix}.mlp.w_gate_up", (expert, rows)
        name = name.replace(".block_sparse_moe.", ".mlp.")
        match = _FUSED_EXPERTS.fullmatch(name)
        if match:
            return f"{match.group(1)}.mlp.{'w_gate_up' if match.group(2) == 'gate_up_proj' else 'w_down'}", None
        return name, None


class MixtralForCausalLM(_MoEForCausalLM):
    """Mixtral: every layer is sparse; top-k weights always renormalised and kept in float32."""

    _expert_key = _MIXTRAL_EXPERT

    def _make_attention(self, layer_idx: int) -> Attention:
        return Attention(self.config, self.lora_ctx, qkv_bias=False, o_bias=False)

    def _make_mlp(self, layer_idx: int) -> nn.Module:
        return SparseMoE(
            self.config, self.lora_ctx, renormalize=True, weights_in_activation_dtype=False, has_shared_expert=False
        )


class Qwen2MoeForCausalLM(_MoEForCausalLM):
    """Qwen2-MoE: q/k/v biases, sparse layers every `decoder_sparse_step` (except `mlp_only_layers`), shared expert."""

    _expert_key = _QWEN2_MOE_EXPERT

    def _make_attention(self, layer_idx: int) -> Attention:
        return Attention(self.config, self.lora_ctx, qkv_bias=self.config.attention_bias, o_bias=False)

    def _make_mlp(self, layer_idx: int) -> nn.Module:
        config = self.config
        if not config.is_moe_layer(layer_idx):
            return DenseMLP(config.hidden_size, config.intermediate_size, self.lora_ctx)
        return SparseMoE(
            config,
            self.lora_ctx,
            renormalize=config.norm_topk_prob,
            weights_in_activation_dtype=True,
            has_shared_expert=config.shared_expert_intermediate_size > 0,
        )

"""One decoder-only causal LM covering Llama, Mistral, Qwen2, Mixtral and Qwen2-MoE.

The architectures differ only in attention bias, the MLP of each layer (dense or
sparse MoE) and checkpoint key names, so one module tree with HF's names serves all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from kernels import ops
from kernels.metadata import AttentionMetadata
from workers.engine.config import ModelConfig
from workers.engine.lora_layers import LoRAContext, LoRALinear
from workers.engine.models.layers import Attention, DenseMLP, RMSNorm
from workers.engine.models.moe import SparseMoE

_MIXTRAL_EXPERT = re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_QWEN_EXPERT = re.compile(r"(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_EXPERT_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, lora_ctx: LoRAContext, cos_sin: torch.Tensor) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, lora_ctx, cos_sin)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, lora_ctx)

    def forward(self, hidden, residual, positions, key_cache, value_cache, meta):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, positions, key_cache, value_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, lora_ctx: LoRAContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        cos_sin = ops.rope_cos_sin_cache(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, dtype
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i, lora_ctx, cos_sin) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """forward(input_ids, positions, kv_caches, meta, lora_slots) -> hidden; compute_logits(hidden) -> logits."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.lora_ctx = LoRAContext()
        self.model = DecoderModel(config, self.lora_ctx, dtype)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.lora_ctx.token_slots = lora_slots
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        for layer, (key_cache, value_cache) in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, positions, key_cache, value_cache, meta)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (hidden @ weight.t()).float()

    def lora_targets(self) -> dict[str, LoRALinear]:
        return {name: module for name, module in self.named_modules() if isinstance(module, LoRALinear)}

    def expert_counts(self) -> dict[int, list[int]]:
        return {
            i: layer.mlp.expert_counts.tolist()
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.mlp, SparseMoE)
        }

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors in; raise `ValueError` on unknown, misshapen or missing ones."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        expert_parts: dict[str, int] = {}
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            target, rows = self._map_name(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to a {self.config.architecture}")
            param = params[target]
            dest = param if rows is None else param[rows[0]][rows[1] : rows[2]]
            if dest.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(dest.shape)}")
            dest.copy_(tensor)
            if rows is None:
                loaded.add(target)
            else:
                expert_parts[target] = expert_parts.get(target, 0) + dest.numel()
        loaded |= {name for name, n in expert_parts.items() if n == params[name].numel()}
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _map_name(self, name: str) -> tuple[str, tuple[int, int, int] | None]:
        """Map a checkpoint key to (parameter name, None) or, for per-expert keys, (stacked name, (expert, lo, hi))."""
        match = _MIXTRAL_EXPERT.fullmatch(name) or _QWEN_EXPERT.fullmatch(name)
        if match:
            prefix, expert, part = match.group(1), int(match.group(2)), _EXPERT_PART[match.group(3)]
            inter = self.config.moe_intermediate_size
            if part == "down":
                return f"{prefix}.mlp.w_down", (expert, 0, self.config.hidden_size)
            lo = 0 if part == "gate" else inter
            return f"{prefix}.mlp.w_gate_up", (expert, lo, lo + inter)
        match = _FUSED_EXPERTS.fullmatch(name)
        if match:
            return f"{match.group(1)}.mlp.{'w_gate_up' if match.group(2) == 'gate_up_proj' else 'w_down'}", None
        return name.replace(".block_sparse_moe.", ".mlp."), None

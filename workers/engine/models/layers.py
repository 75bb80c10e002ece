"""Building blocks every decoder shares: RMSNorm, paged-KV attention, the SwiGLU MLP and the pre-norm layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from kernels.metadata import AttentionMetadata
from workers.engine.config import ModelConfig
from workers.engine.lora_layers import LoRAContext, LoRALinear


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add: `norm(x)` or `(norm(x + residual), x + residual)`."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """GQA self-attention with RoPE: writes this step's K/V into the paged cache, then attends through block tables."""

    def __init__(self, config: ModelConfig, lora_ctx: LoRAContext, *, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = LoRALinear(hidden, q_size, bias=qkv_bias, ctx=lora_ctx)
        self.k_proj = LoRALinear(hidden, kv_size, bias=qkv_bias, ctx=lora_ctx)
        self.v_proj = LoRALinear(hidden, kv_size, bias=qkv_bias, ctx=lora_ctx)
        self.o_proj = LoRALinear(q_size, hidden, bias=o_bias, ctx=lora_ctx)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = ops.apply_rotary(q, k, positions, cos_sin_cache)
        ops.write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        out = ops.paged_attention(q, key_cache, value_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class DenseMLP(nn.Module):
    """SwiGLU MLP: `down(silu(gate(x)) * up(x))`, every projection a LoRA target."""

    def __init__(self, hidden_size: int, intermediate_size: int, lora_ctx: LoRAContext, *, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = LoRALinear(hidden_size, intermediate_size, bias=bias, ctx=lora_ctx)
        self.up_proj = LoRALinear(hidden_size, intermediate_size, bias=bias, ctx=lora_ctx)
        self.down_proj = LoRALinear(intermediate_size, hidden_size, bias=bias, ctx=lora_ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: `h + attn(norm(h))`, then `h + mlp(norm(h))`, with the residual adds fused into the norms."""

    def __init__(self, config: ModelConfig, self_attn: Attention, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(mlp_out, residual)`; the caller (next layer or final norm) adds them."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, positions, cos_sin_cache, kv_cache[0], kv_cache[1], meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

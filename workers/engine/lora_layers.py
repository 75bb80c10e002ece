"""Linear layers that can add a different LoRA adapter per token.

`LoRAManager` (workers/engine/lora.py) fills `lora_a`/`lora_b` of every target layer
with stacked slot weights; the model runner sets `LoRAContext.token_slots` per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops


class LoRAContext:
    """Per-step LoRA state shared by every `LoRALinear` of one model."""

    def __init__(self) -> None:
        self.token_slots: torch.Tensor | None = None
        """[T] int64 adapter slot of each token, -1 for the base model; None when no token uses LoRA."""


class LoRALinear(nn.Module):
    """`nn.Linear` whose output gains `x @ A[slot].T @ B[slot].T` for tokens with an adapter slot."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, ctx: LoRAContext) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.ctx = ctx
        self.lora_a: torch.Tensor | None = None
        """[num_slots, max_rank, in_features], zero-padded past each adapter's rank."""
        self.lora_b: torch.Tensor | None = None
        """[num_slots, out_features, max_rank], with the adapter's scaling folded in."""
        # W4A16 codes `[in // 8, out]` int32 and scales `[in // group_size, out]` once `quantize_w4a16`
        # ran (then `weight` is None); buffers, so they follow the module across devices.
        self.register_buffer("qweight", None)
        self.register_buffer("scales", None)
        self.group_size = 0

    def quantize_w4a16(self, group_size: int) -> None:
        """Replace the dense weight by group-wise int4 codes and scales (see `kernels/quant.py`)."""
        packed = ops.quantize_w4(self.weight.data, group_size)
        self.qweight, self.scales, self.group_size = packed.qweight, packed.scales, group_size
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            y = ops.w4a16_matmul(x, self.qweight, self.scales, self.group_size, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora_a is not None and self.ctx.token_slots is not None:
            ops.add_lora(y, x, self.lora_a, self.lora_b, self.ctx.token_slots)
        return y

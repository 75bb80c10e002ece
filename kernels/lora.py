"""Batched multi-LoRA reference (BGMV/SGMV semantics): every token carries its own adapter slot."""

from __future__ import annotations

import torch


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """`y[t] += x[t] @ A[s].T @ B[s].T` for `s = slots[t] >= 0`, in place. Scaling is folded into B."""
    unique = torch.unique(slots).tolist()
    # Group tokens by adapter (the loop is over distinct adapters, never over tokens).
    for slot in unique:
        if slot < 0:
            continue
        if len(unique) == 1:
            y += (x @ lora_a[slot].t()) @ lora_b[slot].t()
            return
        rows = (slots == slot).nonzero().squeeze(1)
        delta = (x.index_select(0, rows) @ lora_a[slot].t()) @ lora_b[slot].t()
        y.index_add_(0, rows, delta)

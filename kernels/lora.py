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


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`[T, max_rank]` buffer with row t = `x[t] @ A[slots[t]].T`, zeros where `slots[t] < 0`."""
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=x.dtype, device=x.device)
    for slot in torch.unique(slots).tolist():
        if slot >= 0:
            rows = (slots == slot).nonzero().squeeze(1)
            out[rows] = x.index_select(0, rows) @ lora_a[slot].t()
    return out


def lora_expand(y: torch.Tensor, buffer: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor) -> None:
    """`y[t] += buffer[t] @ B[slots[t]].T` in place for tokens with an adapter."""
    for slot in torch.unique(slots).tolist():
        if slot >= 0:
            rows = (slots == slot).nonzero().squeeze(1)
            y.index_add_(0, rows, buffer.index_select(0, rows) @ lora_b[slot].t())

"""The ops the engine calls, dispatched to a backend.

Only the torch reference backend exists today; it is what CPU workers run. A Triton
backend for CUDA tensors registers itself here (its own issue). `RAYLANE_KERNELS=reference`
forces the reference everywhere.
"""

from __future__ import annotations

import os

import torch

from kernels import attention, lora, moe, norm, rotary
from kernels.metadata import AttentionMetadata

_BACKENDS = ("auto", "reference")
BACKEND = os.environ.get("RAYLANE_KERNELS", "auto")
if BACKEND not in _BACKENDS:
    raise ValueError(f"RAYLANE_KERNELS={BACKEND!r} is not one of {_BACKENDS}")


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if key.shape != value.shape or key.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"key {tuple(key.shape)}, value {tuple(value.shape)} and {slot_mapping.shape[0]} slots differ")
    if key.shape[1] != key_cache.shape[0] or key.shape[2] != key_cache.shape[3]:
        raise ValueError(
            f"key heads/dim {tuple(key.shape[1:])} do not match the [kvh, NB, bs, d] cache {tuple(key_cache.shape)}"
        )
    attention.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    if query.dim() != 3 or query.shape[2] != key_cache.shape[3]:
        raise ValueError(f"query {tuple(query.shape)} must be [T, heads, {key_cache.shape[3]}]")
    if query.shape[1] % key_cache.shape[0]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key_cache.shape[0]} KV heads")
    return attention.paged_attention(query, key_cache, value_cache, meta, scale)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm weight has {weight.shape[0]} features, input has {x.shape[-1]}")
    return norm.rms_norm(x, weight, eps, residual)


rope_cos_sin_cache = rotary.rope_cos_sin_cache


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if query.shape[-1] != cos_sin_cache.shape[-1]:
        raise ValueError(f"head_dim {query.shape[-1]} does not match the rotary cache {cos_sin_cache.shape[-1]}")
    return rotary.apply_rotary(query, key, positions, cos_sin_cache)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    if w_gate_up.shape[0] != w_down.shape[0] or w_gate_up.shape[1] != 2 * w_down.shape[2]:
        raise ValueError(f"w_gate_up {tuple(w_gate_up.shape)} and w_down {tuple(w_down.shape)} disagree")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk ids {tuple(topk_ids.shape)} / weights {tuple(topk_weights.shape)} for {x.shape[0]} tokens"
        )
    return moe.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)


moe_expert_counts = moe.moe_expert_counts


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor) -> None:
    if slots.shape[0] != x.shape[0] or lora_a.shape[2] != x.shape[1] or lora_b.shape[1] != y.shape[1]:
        raise ValueError(
            f"add_lora shapes disagree: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(lora_a.shape)}, "
            f"B {tuple(lora_b.shape)}, slots {tuple(slots.shape)}"
        )
    lora.add_lora(y, x, lora_a, lora_b, slots)

"""The ops the engine calls, dispatched to a backend.

Every op checks its inputs (a bad shape, dtype or device raises `ValueError`), then runs
either the Triton kernel (`kernels/gpu/`) or the torch reference next to it. The default,
`auto`, picks Triton for CUDA tensors when triton is installed and the reference otherwise.
`RAYLANE_KERNELS=reference` forces the reference everywhere; `RAYLANE_KERNELS=triton`
forces Triton, which on CPU tensors needs `TRITON_INTERPRET=1` (the kernel tests). A
`backend=` argument overrides the environment for one call.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from kernels import attention, lora, moe, norm, quant, rotary
from kernels.metadata import AttentionMetadata

_BACKENDS = ("auto", "reference", "triton")
BACKEND = os.environ.get("RAYLANE_KERNELS", "auto")
if BACKEND not in _BACKENDS:
    raise ValueError(f"RAYLANE_KERNELS={BACKEND!r} is not one of {_BACKENDS}")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """Whether triton imports here (it is optional: CPU-only installs, e.g. macOS, lack it)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _gpu(name: str) -> ModuleType:
    # Imported on first use so that importing kernels never imports triton.
    return importlib.import_module(f"kernels.gpu.{name}")


def use_triton(tensor: torch.Tensor, backend: str | None = None) -> bool:
    """Whether an op on `tensor` runs the Triton kernel under `backend` (default: `RAYLANE_KERNELS`)."""
    choice = backend or BACKEND
    if choice not in _BACKENDS:
        raise ValueError(f"backend {choice!r} is not one of {_BACKENDS}")
    if choice == "reference":
        return False
    if choice == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise ValueError("backend 'triton' was requested but triton is not installed")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("Triton on CPU tensors needs TRITON_INTERPRET=1, set before triton is imported")
    return True


def _same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"inputs are on different devices: {devices}")


def _float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _integer(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")


def _unit_stride(**tensors: torch.Tensor) -> None:
    # The Triton kernels index the last dim as contiguous; the references do not care.
    for name, t in tensors.items():
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim for Triton, got strides {t.stride()}")


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Scatter K/V `[T, kvh, d]` into slot `slot_mapping[t]` of the `[kvh, NB, bs, d]` caches."""
    if key.shape != value.shape or key.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"key {tuple(key.shape)}, value {tuple(value.shape)} and {slot_mapping.shape[0]} slots differ")
    if key.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"key must be [T, kvh, d] and both caches [kvh, NB, bs, d], got {tuple(key_cache.shape)}")
    if key.shape[1] != key_cache.shape[0] or key.shape[2] != key_cache.shape[3]:
        raise ValueError(
            f"key heads/dim {tuple(key.shape[1:])} do not match the [kvh, NB, bs, d] cache {tuple(key_cache.shape)}"
        )
    _integer("slot_mapping", slot_mapping)
    _same_device(key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    if use_triton(key, backend):
        _unit_stride(key=key, value=value, key_cache=key_cache)
        if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
            raise ValueError("the KV caches must be contiguous for Triton")
        _gpu("kv_cache").write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    attention.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def _check_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if query.dim() != 3 or query.shape[2] != key_cache.shape[3]:
        raise ValueError(f"query {tuple(query.shape)} must be [T, heads, {key_cache.shape[3]}]")
    if query.shape[1] % key_cache.shape[0]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key_cache.shape[0]} KV heads")
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key cache {tuple(key_cache.shape)} and value cache {tuple(value_cache.shape)} differ")
    if query.dtype != key_cache.dtype or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"query {query.dtype} and caches {key_cache.dtype}/{value_cache.dtype} must share a dtype")
    _float("query", query)
    _same_device(query=query, key_cache=key_cache, value_cache=value_cache)


def _check_tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, num_seqs: int) -> None:
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or seq_lens.shape != (num_seqs,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} must cover {num_seqs} seqs"
        )
    _integer("block_tables", block_tables)
    _integer("seq_lens", seq_lens)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    backend: str | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention for a packed batch of decodes followed by prefill chunks (see `AttentionMetadata`).

    `num_splits` (Triton only) forces the decode split-K factor; None picks it from the shapes.
    """
    _check_attention(query, key_cache, value_cache)
    _check_tables(meta.block_tables, meta.seq_lens, meta.num_seqs)
    if query.shape[0] != meta.query_start_loc_cpu[-1]:
        raise ValueError(f"query has {query.shape[0]} tokens, the metadata {meta.query_start_loc_cpu[-1]}")
    if use_triton(query, backend):
        _unit_stride(query=query)
        return _gpu("attention").paged_attention(query, key_cache, value_cache, meta, scale, num_splits=num_splits)
    return attention.paged_attention(query, key_cache, value_cache, meta, scale)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: query `[B, h, d]`, block_tables `[B, max_blocks]`, seq_lens `[B]`.

    `max_seq_len` (Triton only) spares reading `seq_lens.max()` back from the GPU, a sync that also rules out
    CUDA-graph capture.
    """
    _check_attention(query, key_cache, value_cache)
    _check_tables(block_tables, seq_lens, query.shape[0])
    if use_triton(query, backend):
        _unit_stride(query=query)
        gpu = _gpu("attention")
        return gpu.paged_decode_attention(
            query, key_cache, value_cache, block_tables, seq_lens, scale, num_splits=num_splits, max_seq_len=max_seq_len
        )
    return attention.paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`, returns `(norm(x + residual), x + residual)`."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm weight has {weight.shape[0]} features, input has {x.shape[-1]}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    _float("x", x)
    if use_triton(x, backend):
        return _gpu("norm_rotary").rms_norm(x, weight.contiguous(), eps, residual)
    return norm.rms_norm(x, weight, eps, residual)


rope_cos_sin_cache = rotary.rope_cos_sin_cache


def apply_rotary(
    query: torch.Tensor,
    key: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query `[T, h, d]` and key `[T, kvh, d]` by `positions [T]` (cache from `rope_cos_sin_cache`)."""
    if query.shape[-1] != cos_sin_cache.shape[-1]:
        raise ValueError(f"head_dim {query.shape[-1]} does not match the rotary cache {cos_sin_cache.shape[-1]}")
    if query.dim() != 3 or key.dim() != 3 or key.shape[-1] != query.shape[-1] or query.shape[-1] % 2:
        raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)} must be [T, heads, even head_dim]")
    if positions.shape != (query.shape[0],) or key.shape[0] != query.shape[0]:
        raise ValueError(f"{tuple(positions.shape)} positions for {query.shape[0]} query / {key.shape[0]} key tokens")
    _integer("positions", positions)
    if use_triton(query, backend):
        _unit_stride(query=query, key=key)
        return _gpu("norm_rotary").apply_rotary(query, key, positions, cos_sin_cache)
    return rotary.apply_rotary(query, key, positions, cos_sin_cache)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`sum_k w_k * down_e(silu(gate_e(x)) * up_e(x))`: x `[T, H]`, w_gate_up `[E, 2I, H]`, w_down `[E, H, I]`."""
    if w_gate_up.shape[0] != w_down.shape[0] or w_gate_up.shape[1] != 2 * w_down.shape[2]:
        raise ValueError(f"w_gate_up {tuple(w_gate_up.shape)} and w_down {tuple(w_down.shape)} disagree")
    if x.dim() != 2 or w_gate_up.shape[2] != x.shape[1] or w_down.shape[1] != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} must be [T, H] with H = {w_gate_up.shape[2]} = {w_down.shape[1]}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk ids {tuple(topk_ids.shape)} / weights {tuple(topk_weights.shape)} for {x.shape[0]} tokens"
        )
    if x.dtype != w_gate_up.dtype or x.dtype != w_down.dtype:
        raise ValueError(f"x {x.dtype} and expert weights {w_gate_up.dtype}/{w_down.dtype} must share a dtype")
    _integer("topk_ids", topk_ids)
    _same_device(x=x, w_gate_up=w_gate_up, w_down=w_down, topk_weights=topk_weights, topk_ids=topk_ids)
    if use_triton(x, backend):
        _unit_stride(x=x)
        return _gpu("moe").fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)
    return moe.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)


moe_expert_counts = moe.moe_expert_counts
moe_align_block_size = moe.align_block_size


def _check_lora(x: torch.Tensor, lora: torch.Tensor, slots: torch.Tensor, name: str) -> None:
    if lora.dim() != 3 or x.dim() != 2 or slots.shape != (x.shape[0],):
        raise ValueError(f"{name} {tuple(lora.shape)} must be [slots, out, in], x [T, in], slots [T]")
    if x.dtype != lora.dtype:
        raise ValueError(f"x {x.dtype} and {name} {lora.dtype} must share a dtype")
    _integer("slots", slots)
    _same_device(x=x, lora=lora, slots=slots)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    *,
    backend: str | None = None,
    mode: str | None = None,
) -> None:
    """`y[t] += x[t] @ A[s].T @ B[s].T` for `s = slots[t] >= 0`, in place (-1: no adapter).

    A `[L, R, in]`, B `[L, out, R]` with mixed ranks zero-padded to R. `mode` (Triton):
    `sgmv` (adapter-sorted tiles, prefill), `bgmv` (per token, decode) or None (by size).
    """
    if slots.shape[0] != x.shape[0] or lora_a.shape[2] != x.shape[1] or lora_b.shape[1] != y.shape[1]:
        raise ValueError(
            f"add_lora shapes disagree: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(lora_a.shape)}, "
            f"B {tuple(lora_b.shape)}, slots {tuple(slots.shape)}"
        )
    if lora_a.shape[:2] != (lora_b.shape[0], lora_b.shape[2]) or y.shape[0] != x.shape[0]:
        raise ValueError(f"A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} disagree on slots or rank")
    _check_lora(x, lora_a, slots, "lora_a")
    _check_lora(y, lora_b, slots, "lora_b")
    if mode not in (None, "sgmv", "bgmv"):
        raise ValueError(f"mode must be 'sgmv', 'bgmv' or None, got {mode!r}")
    if use_triton(x, backend):
        _unit_stride(x=x, y=y, lora_a=lora_a, lora_b=lora_b)
        _gpu("lora").add_lora(y, x, lora_a, lora_b, slots, mode=mode)
        return
    lora.add_lora(y, x, lora_a, lora_b, slots)


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, *, backend: str | None = None, mode: str | None = None
) -> torch.Tensor:
    """`[T, R]` with row t = `x[t] @ A[slots[t]].T`, zeros for rows without an adapter."""
    _check_lora(x, lora_a, slots, "lora_a")
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} does not take {x.shape[1]} input features")
    if use_triton(x, backend):
        _unit_stride(x=x, lora_a=lora_a)
        return _gpu("lora").lora_shrink(x, lora_a, slots, mode=mode)
    return lora.lora_shrink(x, lora_a, slots)


def lora_expand(
    y: torch.Tensor,
    buffer: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    *,
    backend: str | None = None,
    mode: str | None = None,
) -> None:
    """`y[t] += buffer[t] @ B[slots[t]].T` in place for rows with an adapter."""
    _check_lora(buffer, lora_b, slots, "lora_b")
    if lora_b.shape[2] != buffer.shape[1] or lora_b.shape[1] != y.shape[1] or y.shape[0] != buffer.shape[0]:
        raise ValueError(
            f"lora_b {tuple(lora_b.shape)} cannot map buffer {tuple(buffer.shape)} into y {tuple(y.shape)}"
        )
    if use_triton(y, backend):
        _unit_stride(y=y, buffer=buffer, lora_b=lora_b)
        _gpu("lora").lora_expand(y, buffer, lora_b, slots, mode=mode)
        return
    lora.lora_expand(y, buffer, lora_b, slots)


quantize_w4 = quant.quantize_w4
dequantize_w4 = quant.dequantize_w4


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """`x [..., K] @ W.T` for a W4A16 weight from `quantize_w4` (see `kernels/quant.py` for the layout)."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int32 [K // 8, N] tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    in_features, out_features = qweight.shape[0] * quant.PACK, qweight.shape[1]
    quant.check_group_size(in_features, group_size)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the quantised weight takes {in_features}")
    if scales.shape != (in_features // group_size, out_features):
        raise ValueError(f"scales {tuple(scales.shape)} must be [{in_features // group_size}, {out_features}]")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or scales.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and scales ({scales.dtype}) must share a float dtype")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias {tuple(bias.shape)} must be [{out_features}]")
    _same_device(x=x, qweight=qweight, scales=scales)
    if use_triton(x, backend):
        _unit_stride(x=x)
        gpu = _gpu("w4a16")
        return gpu.w4a16_matmul(x, qweight.contiguous(), scales.contiguous(), group_size, bias, split_k=split_k)
    return quant.w4a16_matmul(x, qweight, scales, group_size, bias)

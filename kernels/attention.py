"""Paged attention references: KV cache write, batched decode, and per-sequence prefill."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter this step's K/V `[T, kvh, d]` into their cache slots."""
    num_blocks, block_size = key_cache.shape[:2]
    flat_k = key_cache.view(num_blocks * block_size, *key_cache.shape[2:])
    flat_v = value_cache.view(num_blocks * block_size, *value_cache.shape[2:])
    flat_k.index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence, all sequences in one batched computation.

    query `[B, h, d]`, caches `[NB, bs, kvh, d]`, block_tables `[B, max_blocks]`, seq_lens `[B]`.
    """
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = int(seq_lens.max()) if num_seqs else 0
    num_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_blocks]
    # [B, nb, bs, kvh, d] -> [B, kvh, d, L] for K and [B, kvh, L, d] for V
    keys = key_cache[tables].view(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    values = value_cache[tables].view(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    q = query.view(num_seqs, num_kv_heads, group, head_dim).to(torch.float32) * scale
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1).to(torch.float32))  # [B, kvh, g, L]
    positions = torch.arange(num_blocks * block_size, device=query.device)
    pad = positions[None, :] >= seq_lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.transpose(1, 2).to(torch.float32))  # [B, kvh, g, d]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def paged_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention for one sequence's query chunk `[q, h, d]` over its first `seq_len` cached tokens.

    Query token j sits at position `seq_len - q + j` and sees every key at or before it.
    """
    num_queries, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    table = block_table[:num_blocks]
    keys = key_cache[table].reshape(num_blocks * block_size, num_kv_heads, head_dim)[:seq_len]
    values = value_cache[table].reshape(num_blocks * block_size, num_kv_heads, head_dim)[:seq_len]
    group = num_heads // num_kv_heads
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    q, k, v = query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
    if num_queries == seq_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        offset = seq_len - num_queries
        rows = torch.arange(num_queries, device=query.device)[:, None] + offset
        mask = torch.arange(seq_len, device=query.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for a packed batch of decodes followed by prefill chunks (see `AttentionMetadata`)."""
    num_decodes = meta.num_decodes
    if meta.num_prefills == 0:
        return paged_decode_attention(query, key_cache, value_cache, meta.block_tables, meta.seq_lens, scale)
    out = torch.empty_like(query)
    if num_decodes:
        out[:num_decodes] = paged_decode_attention(
            query[:num_decodes],
            key_cache,
            value_cache,
            meta.block_tables[:num_decodes],
            meta.seq_lens[:num_decodes],
            scale,
        )
    qsl = meta.query_start_loc_cpu
    for i in range(num_decodes, meta.num_seqs):
        lo, hi = qsl[i], qsl[i + 1]
        out[lo:hi] = paged_prefill_attention(
            query[lo:hi], key_cache, value_cache, meta.block_tables[i], meta.seq_lens_cpu[i], scale
        )
    return out

"""Triton paged attention: decode (one query per sequence, optional split-K) and varlen causal prefill.

Both read K/V straight from the `[kvh, NB, bs, d]` block pool through block tables, so no
gathered copy of the context is ever made. Softmax runs online in base 2 (`exp2`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gpu.common import IS_INTERPRETER, mma, next_pow2, num_sms
from kernels.metadata import AttentionMetadata

_LOG2E = 1.4426950408889634
# Each split of a long context keeps at least this many tokens, so the merge stays cheap.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 32


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_ch,
    stride_cb,
    stride_cs,
    stride_tb,
    stride_ob,
    stride_oh,
    group,
    head_dim,
    block_size,
    tokens_per_split,
    num_splits,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_SPLIT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    start = split * tokens_per_split
    stop = tl.minimum(seq_len, start + tokens_per_split)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    g_mask = g < group
    d_mask = d < head_dim
    # All query heads of one KV head share its K/V loads (GQA); padded rows are zeros.
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < stop
        block = tl.load(tables_ptr + seq * stride_tb + n // block_size, mask=n_mask, other=0).to(tl.int64)
        kv_off = kv_head * stride_ch + block * stride_cb + (n % block_size) * stride_cs
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_G, BLOCK_N], tl.float32)) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None])
        m = m_new
    has_tokens = l_sum > 0
    out = acc / tl.where(has_tokens, l_sum, 1.0)[:, None]
    if IS_SPLIT:
        part = (seq * tl.num_programs(1) * group + heads) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * head_dim + d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
        lse = tl.where(has_tokens, m + tl.log2(tl.where(has_tokens, l_sum, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_mask)
    else:
        dst = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    num_splits,
    head_dim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + s, mask=s_mask, other=float("-inf"))
    # Split 0 always holds tokens (every context has at least one), so the max is finite.
    weights = tl.exp2(lse - tl.max(lse, 0))
    weights = weights / tl.sum(weights, 0)
    parts = tl.load(
        part_out_ptr + (row * num_splits + s)[:, None] * head_dim + d[None, :],
        mask=s_mask[:, None] & (d[None, :] < head_dim),
        other=0.0,
    )
    out = tl.sum(parts * weights[:, None], 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split long contexts only when (sequence, KV head) programs alone would leave the GPU idle."""
    target_programs = 2 * num_sms(device)
    by_occupancy = -(-target_programs // max(num_seqs * num_kv_heads, 1))
    by_length = -(-max_seq_len // _MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, _MAX_SPLITS))


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.attention.paged_decode_attention`; `num_splits > 1` forces split-K."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, _, block_size, _ = key_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
    block_n = 16 if IS_INTERPRETER else 32
    tokens_per_split = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    is_split = num_splits > 1
    if is_split:
        part_out = torch.empty(num_seqs * num_heads * num_splits, head_dim, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused: the kernel writes `out` directly
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        group,
        head_dim,
        block_size,
        tokens_per_split,
        num_splits,
        BLOCK_G=next_pow2(group, 16),
        BLOCK_N=block_n,
        BLOCK_D=next_pow2(head_dim, 16),
        IS_SPLIT=is_split,
    )
    if is_split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            num_splits,
            head_dim,
            BLOCK_S=next_pow2(num_splits),
            BLOCK_D=next_pow2(head_dim),
        )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    tables_ptr,
    query_start_ptr,
    seq_lens_ptr,
    out_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ch,
    stride_cb,
    stride_cs,
    stride_tb,
    stride_ot,
    stride_oh,
    group,
    head_dim,
    block_size,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    # Tiles past this sequence's query length have nothing to do (the grid fits the longest).
    if tile * BLOCK_M < q_len:
        prefix = seq_len - q_len
        kv_head = head // group
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < q_len
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        tokens = (q_start + rows).to(tl.int64)
        q = tl.load(
            q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        q_pos = prefix + rows
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Causality: this tile's last query sees keys up to its own position, never beyond.
        kv_stop = tl.minimum(seq_len, prefix + (tile + 1) * BLOCK_M)
        for n0 in range(0, kv_stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < kv_stop
            block = tl.load(tables_ptr + seq * stride_tb + n // block_size, mask=n_mask, other=0).to(tl.int64)
            kv_off = kv_head * stride_ch + block * stride_cb + (n % block_size) * stride_cs
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * scale_log2
            s = tl.where(n_mask[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = mma(p.to(v.dtype), v, acc * alpha[:, None])
            m = m_new
        out = acc / l_sum[:, None]
        dst = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for packed query chunks `[T, h, d]` over their cached prefixes and themselves.

    Sequence i owns query rows `[query_start_loc[i], query_start_loc[i+1])`; its K/V (prefix
    and this chunk) must already be in the cache, and its query j sits at position
    `seq_lens[i] - q_len + j`. This is what chunked prefill and prefix caching need.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, _, block_size, _ = key_cache.shape
    out = torch.empty_like(query) if out is None else out
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return out
    block_m = 16 if IS_INTERPRETER else 64
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        num_heads // num_kv_heads,
        head_dim,
        block_size,
        BLOCK_M=block_m,
        BLOCK_N=16 if IS_INTERPRETER else 64,
        BLOCK_D=next_pow2(head_dim, 16),
    )
    return out


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.attention.paged_attention`: decodes first, then prefill chunks."""
    out = torch.empty_like(query)
    num_decodes = meta.num_decodes
    qsl = meta.query_start_loc_cpu
    if num_decodes:
        paged_decode_attention(
            query[:num_decodes],
            key_cache,
            value_cache,
            meta.block_tables[:num_decodes],
            meta.seq_lens[:num_decodes],
            scale,
            max_seq_len=max(meta.seq_lens_cpu[:num_decodes]),
            num_splits=num_splits,
            out=out[:num_decodes],
        )
    if meta.num_prefills:
        first = qsl[num_decodes]
        max_query_len = max(qsl[i + 1] - qsl[i] for i in range(num_decodes, meta.num_seqs))
        paged_prefill_attention(
            query[first:],
            key_cache,
            value_cache,
            meta.query_start_loc[num_decodes:] - first,
            meta.seq_lens[num_decodes:],
            meta.block_tables[num_decodes:],
            scale,
            max_query_len=max_query_len,
            out=out[first:],
        )
    return out

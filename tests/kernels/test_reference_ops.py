"""Reference kernels against obviously-correct dense computations and HF's own modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import ops
from kernels.metadata import AttentionMetadata


def _build_batch(seq_lens, query_lens, *, heads, kv_heads, head_dim=16, block_size=4, seed=0, device="cpu"):
    """A paged cache filled with random K/V plus the dense per-sequence copies to check against, on `device`."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    key_cache = torch.zeros(kv_heads, num_blocks, block_size, head_dim)
    value_cache = torch.zeros_like(key_cache)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.long)
    dense = []
    for i, n in enumerate(seq_lens):
        nb = -(-n // block_size)
        tables[i, :nb] = torch.tensor(perm[:nb])
        perm = perm[nb:]
        k = torch.randn(n, kv_heads, head_dim, generator=gen)
        v = torch.randn(n, kv_heads, head_dim, generator=gen)
        slots = tables[i, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
        ops.write_kv_cache(k, v, key_cache, value_cache, slots)
        dense.append((k, v))
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    num_decodes = next((i for i, q in enumerate(query_lens) if q != 1), len(query_lens))
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(qsl[-1], dtype=torch.long),
        query_start_loc=torch.tensor(qsl),
        seq_lens=torch.tensor(seq_lens),
        block_tables=tables,
        num_decodes=num_decodes,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(seq_lens),
        block_size=block_size,
    )
    query = torch.randn(qsl[-1], heads, head_dim, generator=gen)
    meta = AttentionMetadata(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(meta).items()})
    dense = [(k.to(device), v.to(device)) for k, v in dense]
    return query.to(device), key_cache.to(device), value_cache.to(device), meta, dense


def _dense_reference(query, meta, dense, scale):
    out = []
    for i, (k, v) in enumerate(dense):
        q = query[meta.query_start_loc_cpu[i] : meta.query_start_loc_cpu[i + 1]]
        n, nq = k.shape[0], q.shape[0]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        causal = torch.arange(n, device=q.device)[None, :] <= (torch.arange(nq, device=q.device)[:, None] + n - nq)
        scores = scores.masked_fill(~causal, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(out)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize(
    "seq_lens,query_lens",
    [
        ([5, 17, 4, 8], [1, 1, 1, 1]),  # decodes only, odd lengths and block boundaries
        ([9], [9]),  # one plain prefill
        ([3, 13, 21, 16], [1, 1, 7, 16]),  # decodes, a chunk over a cached prefix, a full prefill
        ([33], [1]),
        ([int(n) for n in torch.randint(1, 60, (40,), generator=torch.Generator().manual_seed(3))], [1] * 40),
    ],
)
def test_paged_attention_matches_dense(heads, kv_heads, seq_lens, query_lens):
    query, kc, vc, meta, dense = _build_batch(seq_lens, query_lens, heads=heads, kv_heads=kv_heads)
    out = ops.paged_attention(query, kc, vc, meta, scale=0.25)
    torch.testing.assert_close(out, _dense_reference(query, meta, dense, 0.25), rtol=1e-5, atol=1e-5)


def test_paged_attention_bf16_is_close():
    query, kc, vc, meta, dense = _build_batch([7, 20], [1, 6], heads=4, kv_heads=2)
    out = ops.paged_attention(query.bfloat16(), kc.bfloat16(), vc.bfloat16(), meta, scale=0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _dense_reference(query, meta, dense, 0.25), rtol=3e-2, atol=3e-2)


def test_write_kv_cache_scatters_to_slots():
    kc, vc = torch.zeros(2, 4, 2, 3), torch.zeros(2, 4, 2, 3)  # [kvh, blocks, block_size, head_dim]
    key, value = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    ops.write_kv_cache(key, value, kc, vc, torch.tensor([7, 0, 3]))
    assert torch.equal(kc[:, 3, 1], key[0]) and torch.equal(kc[:, 0, 0], key[1])
    assert torch.equal(vc[:, 1, 1], value[2])
    with pytest.raises(ValueError, match="slots"):
        ops.write_kv_cache(key, value, kc, vc, torch.tensor([1]))


def test_attention_shape_errors():
    query, kc, vc, meta, _ = _build_batch([4], [1], heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="multiple"):
        ops.paged_attention(query[:, :3], kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match=r"\[T, heads"):
        ops.paged_attention(query[..., :8], kc, vc, meta, 1.0)


def test_rms_norm_matches_hf_and_fuses_residual():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, res = torch.randn(5, 32), torch.randn(5, 32)
    hf = LlamaRMSNorm(32, eps=1e-5)
    hf.weight.data = torch.randn(32)
    torch.testing.assert_close(ops.rms_norm(x, hf.weight, 1e-5), hf(x), rtol=0, atol=0)
    out, new_res = ops.rms_norm(x, hf.weight, 1e-5, residual=res)
    torch.testing.assert_close(new_res, x + res, rtol=0, atol=0)
    torch.testing.assert_close(out, hf(x + res), rtol=0, atol=0)
    with pytest.raises(ValueError, match="features"):
        ops.rms_norm(x, torch.ones(31), 1e-5)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rotary_matches_hf(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, max_pos = 16, 256
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=max_pos,
        rope_theta=500000.0,
        rope_scaling=scaling,
    )
    hf = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 255])
    q, k = torch.randn(7, 4, head_dim), torch.randn(7, 2, head_dim)
    cos, sin = hf(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cache = ops.rope_cos_sin_cache(head_dim, max_pos, 500000.0, scaling, torch.float32)
    our_q, our_k = ops.apply_rotary(q, k, positions, cache)
    torch.testing.assert_close(our_q, hf_q[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_k, hf_k[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_moe_matches_per_token_loop(top_k):
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts = 13, 8, 6, 4
    x = torch.randn(tokens, hidden, generator=gen)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen)
    w_down = torch.randn(experts, hidden, inter, generator=gen)
    weights = torch.rand(tokens, top_k, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    expected = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(top_k):
            e = ids[t, j]
            h = F.silu(w_gate_up[e, :inter] @ x[t]) * (w_gate_up[e, inter:] @ x[t])
            expected[t] += weights[t, j] * (w_down[e] @ h)
    torch.testing.assert_close(ops.fused_moe(x, w_gate_up, w_down, weights, ids), expected, rtol=1e-5, atol=1e-5)
    assert ops.moe_expert_counts(ids, experts).sum() == tokens * top_k
    with pytest.raises(ValueError, match="disagree"):
        ops.fused_moe(x, w_gate_up[:, :-1], w_down, weights, ids)


@pytest.mark.parametrize("rank", [8, 16])
def test_add_lora_matches_per_token_loop(rank):
    gen = torch.Generator().manual_seed(1)
    tokens, d_in, d_out, slots = 11, 12, 10, 3
    x, y = torch.randn(tokens, d_in, generator=gen), torch.randn(tokens, d_out, generator=gen)
    lora_a, lora_b = torch.randn(slots, rank, d_in, generator=gen), torch.randn(slots, d_out, rank, generator=gen)
    token_slots = torch.tensor([0, -1, 2, 2, 1, -1, 0, 0, 1, 2, -1])
    expected = y.clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            expected[t] += lora_b[s] @ (lora_a[s] @ x[t])
    ops.add_lora(y, x, lora_a, lora_b, token_slots)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    single = torch.zeros(tokens, d_out)
    ops.add_lora(single, x, lora_a, lora_b, torch.full((tokens,), 1))
    torch.testing.assert_close(single, x @ lora_a[1].T @ lora_b[1].T, rtol=1e-5, atol=1e-5)

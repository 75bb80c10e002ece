"""Triton KV write, paged decode (incl. split-K) and varlen prefill attention, RMSNorm and rotary vs their references.

Compiled on the GPU when there is one, else in Triton's interpreter on CPU (see conftest.py); shapes stay tiny
so the interpreter stays fast.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from kernels.metadata import AttentionMetadata
from tests.kernels.devices import TRITON_DEVICE as DEVICE
from tests.kernels.test_reference_ops import _build_batch, _dense_reference

pytest.importorskip("triton")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype] * scale
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    # K/V arrive in the cache dtype (the interpreter's float32 -> bfloat16 cast truncates instead of rounding).
    key = torch.randn(7, 2, 12, generator=gen).to(DEVICE, dtype)
    value = torch.randn(7, 2, 12, generator=gen).to(DEVICE, dtype)
    # Block boundaries of a 4-token block, head_dim not a power of 2.
    slots = torch.tensor([0, 3, 4, 9, 15, 12, 6], device=DEVICE)
    caches = [torch.zeros(2, 4, 4, 12, dtype=dtype, device=DEVICE) for _ in range(4)]
    ops.write_kv_cache(key, value, caches[0], caches[1], slots, backend="reference")
    ops.write_kv_cache(key, value, caches[2], caches[3], slots, backend="triton")
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_write_kv_cache_skips_padding_slots():
    kc, vc = torch.zeros(1, 2, 2, 4, device=DEVICE), torch.zeros(1, 2, 2, 4, device=DEVICE)
    kv = torch.ones(2, 1, 4, device=DEVICE)
    ops.write_kv_cache(kv, kv, kc, vc, torch.tensor([-1, 3], device=DEVICE), backend="triton")
    assert kc.sum() == 4 and torch.equal(kc[0, 1, 1].cpu(), torch.ones(4))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize(
    "seq_lens,query_lens",
    [
        ([5, 17, 4, 8, 1], [1] * 5),  # odd lengths, block boundaries, a one-token context
        ([3, 13, 21, 16], [1, 1, 7, 16]),  # decodes, a chunk over a cached prefix, a full prefill
        ([20, 37], [20, 5]),  # prefill only, a chunk crossing tile boundaries
    ],
)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_paged_attention_matches_dense(heads, kv_heads, seq_lens, query_lens, num_splits):
    query, kc, vc, meta, dense = _build_batch(seq_lens, query_lens, heads=heads, kv_heads=kv_heads, device=DEVICE)
    out = ops.paged_attention(query, kc, vc, meta, 0.25, backend="triton", num_splits=num_splits)
    torch.testing.assert_close(out, _dense_reference(query, meta, dense, 0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_attention_half_precision(dtype):
    query, kc, vc, meta, _ = _build_batch([7, 40, 20], [1, 1, 6], heads=8, kv_heads=2, device=DEVICE)
    args = (query.to(dtype), kc.to(dtype), vc.to(dtype), meta, 0.25)
    expected = ops.paged_attention(*args, backend="reference")
    for splits in (1, 2):
        out = ops.paged_attention(*args, backend="triton", num_splits=splits)
        assert out.dtype == dtype
        _close(out, expected, dtype, scale=2)


def test_paged_decode_split_k_long_context():
    # More splits than some sequences have tokens: empty splits must not disturb the merge.
    query, kc, vc, meta, dense = _build_batch([70, 3], [1, 1], heads=4, kv_heads=1, block_size=8, device=DEVICE)
    out = ops.paged_decode_attention(
        query, kc, vc, meta.block_tables, meta.seq_lens, 0.25, backend="triton", num_splits=5
    )
    torch.testing.assert_close(out, _dense_reference(query, meta, dense, 0.25), rtol=1e-5, atol=1e-5)


def test_attention_rejects_bad_inputs():
    query, kc, vc, meta, _ = _build_batch([4], [1], heads=4, kv_heads=2, device=DEVICE)
    with pytest.raises(ValueError, match="share a dtype"):
        ops.paged_attention(query.half(), kc, vc, meta, 1.0, backend="triton")
    with pytest.raises(ValueError, match="tokens"):
        ops.paged_attention(torch.cat([query, query]), kc, vc, meta, 1.0, backend="triton")
    with pytest.raises(ValueError, match="contiguous last dim"):
        ops.paged_attention(query.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, meta, 1.0, backend="triton")
    bad = AttentionMetadata(**{**vars(meta), "block_tables": meta.block_tables.float()})
    with pytest.raises(ValueError, match="int32 or int64"):
        ops.paged_attention(query, kc, vc, bad, 1.0, backend="triton")
    with pytest.raises(ValueError, match="not one of"):
        ops.paged_attention(query, kc, vc, meta, 1.0, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features", [32, 40])
def test_rms_norm_matches_reference(dtype, features):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, features, generator=gen).to(DEVICE, dtype)
    res = torch.randn(5, features, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(features, generator=gen).to(DEVICE, dtype)
    _close(ops.rms_norm(x, weight, 1e-5, backend="triton"), ops.rms_norm(x, weight, 1e-5, backend="reference"), dtype)
    out, new_res = ops.rms_norm(x, weight, 1e-5, res, backend="triton")
    ref_out, ref_res = ops.rms_norm(x, weight, 1e-5, res, backend="reference")
    _close(new_res, ref_res, dtype)  # bit-equal on GPU; the interpreter truncates to bfloat16
    _close(out, ref_out, dtype)
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(x, weight, 1e-5, res[:2], backend="triton")


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [None, LLAMA3])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_rotary_matches_reference(dtype, scaling, head_dim):
    gen = torch.Generator().manual_seed(3)
    cache = ops.rope_cos_sin_cache(head_dim, 256, 500000.0, scaling, dtype).to(DEVICE)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 255], device=DEVICE)
    q = torch.randn(7, 4, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(7, 2, head_dim, generator=gen).to(DEVICE, dtype)
    ours = ops.apply_rotary(q, k, positions, cache, backend="triton")
    theirs = ops.apply_rotary(q, k, positions, cache, backend="reference")
    for a, b in zip(ours, theirs, strict=True):
        _close(a, b, dtype)
    with pytest.raises(ValueError, match="positions"):
        ops.apply_rotary(q, k, positions[:3], cache, backend="triton")

"""Triton fused MoE, multi-LoRA (SGMV and BGMV) and W4A16 vs their references: compiled on the GPU when there is
one, else in the CPU interpreter."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from tests.kernels.devices import TRITON_DEVICE as DEVICE

pytest.importorskip("triton")

# Half-precision outputs are compared relative to the output's magnitude: one rounding of a
# sum differs by an ulp of the largest term, whatever order the kernel adds in.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(actual, expected, dtype):
    atol = TOL[dtype] * (1.0 + expected.float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=TOL[dtype], atol=atol)


def _moe_inputs(tokens, hidden, inter, experts, top_k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    weights = torch.rand(tokens, top_k, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    return tuple(t.to(DEVICE) for t in (x, w_gate_up, w_down, weights, ids))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(
    "tokens,hidden,inter,experts",
    [
        (13, 32, 24, 4),  # odd token count, intermediate not a multiple of the tile
        (1, 16, 16, 8),  # one decode token, most experts idle (Mixtral-like 8 experts)
        (20, 24, 40, 6),  # more rows than one tile; Qwen2-MoE-like many small experts
    ],
)
def test_fused_moe_matches_reference(top_k, tokens, hidden, inter, experts):
    args = _moe_inputs(tokens, hidden, inter, experts, top_k, torch.float32)
    _close(ops.fused_moe(*args, backend="triton"), ops.fused_moe(*args, backend="reference"), torch.float32)


def test_fused_moe_bf16():
    args = _moe_inputs(9, 32, 16, 4, 2, torch.bfloat16, seed=5)
    _close(ops.fused_moe(*args, backend="triton"), ops.fused_moe(*args, backend="reference"), torch.bfloat16)


def test_align_block_size_pads_each_expert():
    ids = torch.tensor([2, 0, 2, 2, -1, 0])
    sorted_ids, block_groups = ops.moe_align_block_size(ids, 4, 2)
    # Expert 0: items 1, 5; expert 2: items 0, 2, 3 + one pad (6); expert 1 and 3 idle; item 4 dropped.
    assert sorted_ids[:6].tolist() == [1, 5, 0, 2, 3, 6]
    assert block_groups[:3].tolist() == [0, 2, 2] and (block_groups[3:] == -1).all()
    assert (sorted_ids[6:] == 6).all()


@pytest.mark.parametrize("items,groups,block", [(6, 4, 2), (37, 8, 16), (64, 8, 32), (1, 8, 16)])
def test_sync_free_align_matches_reference(items, groups, block):
    from kernels.gpu.grouped_gemm import align_block_size

    ids = torch.randint(-1, groups, (items,), generator=torch.Generator().manual_seed(items))
    expected = ops.moe_align_block_size(ids, groups, block)
    for actual, want in zip(align_block_size(ids.to(DEVICE), groups, block), expected, strict=True):
        assert actual.cpu().tolist() == want.tolist()


def test_fused_moe_rejects_bad_inputs():
    x, w_gate_up, w_down, weights, ids = _moe_inputs(3, 16, 16, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="share a dtype"):
        ops.fused_moe(x.half(), w_gate_up, w_down, weights, ids, backend="triton")
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        ops.fused_moe(x[:, :8], w_gate_up, w_down, weights, ids, backend="triton")
    with pytest.raises(ValueError, match="int32 or int64"):
        ops.fused_moe(x, w_gate_up, w_down, weights, ids.float(), backend="triton")


def _lora_inputs(tokens, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out, num_slots, max_rank = 24, 20, 3, 16
    x = torch.randn(tokens, d_in, generator=gen).to(dtype)
    y = torch.randn(tokens, d_out, generator=gen).to(dtype)
    lora_a = torch.randn(num_slots, max_rank, d_in, generator=gen)
    lora_b = torch.randn(num_slots, d_out, max_rank, generator=gen)
    # Slot 1 is a rank-8 adapter, zero-padded to the max rank 16.
    lora_a[1, 8:], lora_b[1, :, 8:] = 0, 0
    slots = torch.randint(-1, num_slots, (tokens,), generator=gen)
    slots[0] = -1
    return tuple(t.to(DEVICE) for t in (y, x, lora_a.to(dtype), lora_b.to(dtype), slots))


@pytest.mark.parametrize("mode", ["sgmv", "bgmv", None])
@pytest.mark.parametrize("tokens", [1, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_lora_matches_reference(mode, tokens, dtype):
    y, x, lora_a, lora_b, slots = _lora_inputs(tokens, dtype)
    expected = y.clone()
    ops.add_lora(expected, x, lora_a, lora_b, slots, backend="reference")
    ops.add_lora(y, x, lora_a, lora_b, slots, backend="triton", mode=mode)
    _close(y, expected, dtype)


@pytest.mark.parametrize("mode", ["sgmv", "bgmv"])
def test_lora_shrink_and_expand_separately(mode):
    y, x, lora_a, lora_b, slots = _lora_inputs(11, torch.float32, seed=4)
    buffer = ops.lora_shrink(x, lora_a, slots, backend="triton", mode=mode)
    _close(buffer, ops.lora_shrink(x, lora_a, slots, backend="reference"), torch.float32)
    assert (buffer[slots < 0] == 0).all()
    expected = y.clone()
    ops.lora_expand(expected, buffer, lora_b, slots, backend="reference")
    ops.lora_expand(y, buffer, lora_b, slots, backend="triton", mode=mode)
    _close(y, expected, torch.float32)


def test_add_lora_rejects_bad_inputs():
    y, x, lora_a, lora_b, slots = _lora_inputs(4, torch.float32)
    with pytest.raises(ValueError, match="mode"):
        ops.add_lora(y, x, lora_a, lora_b, slots, backend="triton", mode="loop")
    with pytest.raises(ValueError, match="disagree on slots or rank"):
        ops.add_lora(y, x, lora_a, lora_b[:, :, :8], slots, backend="triton")
    with pytest.raises(ValueError, match="share a dtype"):
        ops.add_lora(y, x.half(), lora_a, lora_b, slots, backend="triton")


@pytest.mark.parametrize(
    "group_size,in_features,out_features,tokens",
    [
        (32, 64, 40, 3),  # two groups, N not a multiple of the tile
        (128, 256, 48, 17),  # the default group size, M past one tile
        (64, 64, 16, 1),  # a single group, batch 1
        (48, 96, 20, 5),  # a group size that is not a power of two (per-row scales in a tile)
        (128, 512, 24, 5),  # decode-sized M on GPU: one dot per nibble on magic-number codes
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 2])
def test_w4a16_matches_reference(group_size, in_features, out_features, tokens, dtype, split_k):
    gen = torch.Generator().manual_seed(7)
    packed = ops.quantize_w4(torch.randn(out_features, in_features, generator=gen), group_size, dtype=dtype)
    x = torch.randn(tokens, in_features, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(out_features, generator=gen).to(DEVICE, dtype)
    args = (x, packed.qweight.to(DEVICE), packed.scales.to(DEVICE), group_size, bias)
    out = ops.w4a16_matmul(*args, backend="triton", split_k=split_k)
    assert out.dtype == dtype and out.shape == (tokens, out_features)
    _close(out, ops.w4a16_matmul(*args, backend="reference"), dtype)


def test_quantize_roundtrip_error_is_within_half_a_step():
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(8))
    packed = ops.quantize_w4(weight, 128)
    assert packed.qweight.shape == (32, 24) and packed.scales.shape == (2, 24)
    error = (ops.dequantize_w4(packed.qweight, packed.scales, 128).t() - weight).abs()
    step = packed.scales.repeat_interleave(128, 0).t()
    assert (error <= step / 2 + 1e-6).all()


def test_w4a16_rejects_bad_inputs():
    packed = ops.quantize_w4(torch.randn(8, 64, device=DEVICE), 32, dtype=torch.float16)
    x = torch.randn(2, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ops.quantize_w4(torch.randn(8, 48), 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.quantize_w4(torch.randn(8, 48), 12)
    with pytest.raises(ValueError, match="features"):
        ops.w4a16_matmul(x[:, :32], packed.qweight, packed.scales, 32, backend="triton")
    with pytest.raises(ValueError, match="scales"):
        ops.w4a16_matmul(x, packed.qweight, packed.scales[:1], 32, backend="triton")
    with pytest.raises(ValueError, match="share a float dtype"):
        ops.w4a16_matmul(x.float(), packed.qweight, packed.scales, 32, backend="triton")

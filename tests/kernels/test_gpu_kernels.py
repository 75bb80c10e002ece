"""The Triton-vs-reference comparisons at real sizes on CUDA (skipped without a GPU), plus dispatch rules."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from tests.kernels.test_reference_ops import _build_batch

gpu = pytest.mark.gpu


def test_auto_dispatch_uses_the_reference_on_cpu():
    x = torch.zeros(2, 4)
    assert not ops.use_triton(x, "auto") and not ops.use_triton(x, "reference")
    with pytest.raises(ValueError, match="not one of"):
        ops.use_triton(x, "fast")


def _rel_close(actual, expected, tol):
    scale = 1.0 + expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


@gpu
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_gpu_paged_attention_llama8b_shapes(batch):
    torch.manual_seed(0)
    lens = torch.randint(1, 2048, (batch,)).tolist()
    query, kc, vc, meta, _ = _build_batch(lens, [1] * batch, heads=32, kv_heads=8, head_dim=128, block_size=16)
    args = (query.cuda().half(), kc.cuda().half(), vc.cuda().half())
    meta = type(meta)(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in vars(meta).items()})
    expected = ops.paged_attention(*args, meta, 0.088, backend="reference")
    for splits in (None, 1, 4):
        _rel_close(ops.paged_attention(*args, meta, 0.088, backend="triton", num_splits=splits), expected, 2e-3)


@gpu
def test_gpu_prefill_attention_chunked():
    query, kc, vc, meta, _ = _build_batch([300, 1000, 517], [1, 200, 517], heads=32, kv_heads=8, head_dim=128)
    args = (query.cuda().bfloat16(), kc.cuda().bfloat16(), vc.cuda().bfloat16())
    meta = type(meta)(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in vars(meta).items()})
    expected = ops.paged_attention(*args, meta, 0.088, backend="reference")
    _rel_close(ops.paged_attention(*args, meta, 0.088, backend="triton"), expected, 2e-2)


@gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_gpu_fused_moe_mixtral_shapes(tokens):
    from tests.kernels.test_triton_gemms import _moe_inputs

    args = [t.cuda() for t in _moe_inputs(tokens, 4096, 14336, 8, 2, torch.bfloat16)]
    _rel_close(ops.fused_moe(*args, backend="triton"), ops.fused_moe(*args, backend="reference"), 2e-2)


@gpu
@pytest.mark.parametrize("tokens,mode", [(16, "bgmv"), (512, "sgmv")])
def test_gpu_add_lora_8_adapters(tokens, mode):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, 4096, device="cuda", generator=gen).half()
    y = torch.randn(tokens, 4096, device="cuda", generator=gen).half()
    lora_a = (torch.randn(8, 16, 4096, device="cuda", generator=gen) / 64).half()
    lora_b = (torch.randn(8, 4096, 16, device="cuda", generator=gen) / 4).half()
    lora_a[::2, 8:], lora_b[::2, :, 8:] = 0, 0
    slots = torch.randint(-1, 8, (tokens,), device="cuda", generator=gen)
    expected = y.clone()
    ops.add_lora(expected, x, lora_a, lora_b, slots, backend="reference")
    ops.add_lora(y, x, lora_a, lora_b, slots, backend="triton", mode=mode)
    _rel_close(y, expected, 2e-3)


@gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_gpu_w4a16_llama_shapes(tokens):
    packed = ops.quantize_w4(torch.randn(4096, 4096, device="cuda"), 128, dtype=torch.float16)
    x = torch.randn(tokens, 4096, device="cuda").half()
    args = (x, packed.qweight, packed.scales, 128)
    _rel_close(ops.w4a16_matmul(*args, backend="triton"), ops.w4a16_matmul(*args, backend="reference"), 2e-3)


@gpu
def test_gpu_rms_norm_and_rotary():
    x, res = (torch.randn(64, 4096, device="cuda").bfloat16() for _ in range(2))
    weight = torch.randn(4096, device="cuda").bfloat16()
    out, new_res = ops.rms_norm(x, weight, 1e-5, res, backend="triton")
    ref_out, ref_res = ops.rms_norm(x, weight, 1e-5, res, backend="reference")
    assert torch.equal(new_res, ref_res)
    _rel_close(out, ref_out, 2e-2)
    cache = ops.rope_cos_sin_cache(128, 8192, 500000.0, None, torch.bfloat16).cuda()
    q, k = torch.randn(64, 32, 128, device="cuda").bfloat16(), torch.randn(64, 8, 128, device="cuda").bfloat16()
    positions = torch.randint(0, 8192, (64,), device="cuda")
    for a, b in zip(
        ops.apply_rotary(q, k, positions, cache, backend="triton"),
        ops.apply_rotary(q, k, positions, cache, backend="reference"),
        strict=True,
    ):
        _rel_close(a, b, 2e-2)

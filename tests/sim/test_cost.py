"""Cost models: the roofline numbers for known cases and the decode fast-forward closed forms."""

from __future__ import annotations

import pytest

from sim.cost import LinearCostModel, StepShape, decode_run_time_s
from sim.cost_roofline import (
    MEMORY_EFFICIENCY,
    MODELS,
    STEP_OVERHEAD_S,
    RooflineCostModel,
)


def test_kv_bytes_per_token_from_model_config() -> None:
    # layers x kv_heads x head_dim x 2 (K and V) x 2 bytes (bf16)
    assert MODELS["llama-3-8b"].kv_bytes_per_token == 32 * 8 * 128 * 2 * 2 == 131072
    assert MODELS["llama-3-70b"].kv_bytes_per_token == 80 * 8 * 128 * 2 * 2


def test_llama8b_h100_single_decode_is_memory_bound_weights_read() -> None:
    model = RooflineCostModel(gpu="H100", model="llama-3-8b", tp=1)
    t = model.step_time_s(StepShape(num_decodes=1, decode_context_sum=1))
    # One decode token: weights (8.03e9 x 2 bytes) plus 2 tokens of KV over 80% of 3.35 TB/s, plus host overhead.
    expected = (8.03e9 * 2 + 2 * 131072) / (3.35e12 * MEMORY_EFFICIENCY) + STEP_OVERHEAD_S
    assert t == pytest.approx(expected, rel=1e-12)
    assert 0.007 < t < 0.008


def test_large_prefill_is_compute_bound() -> None:
    model = RooflineCostModel(gpu="H100", model="llama-3-8b")
    t = model.step_time_s(StepShape(num_prefill_tokens=4096, prefill_attn_work=4096 * 4096))
    flops = 2 * 8.03e9 * 4096 + 4 * 32 * 128 * 32 * 4096 * 4096
    assert t == pytest.approx(flops / (989e12 * 0.6) + STEP_OVERHEAD_S, rel=1e-12)


def test_a100_slower_than_h100_and_tp_adds_allreduce() -> None:
    shape = StepShape(num_decodes=32, decode_context_sum=32 * 2000)
    h100 = RooflineCostModel(gpu="H100", model="llama-3-70b", tp=4)
    a100 = RooflineCostModel(gpu="A100", model="llama-3-70b", tp=4)
    assert a100.step_time_s(shape) > h100.step_time_s(shape)
    assert h100.allreduce_time_s(32) > 0
    assert RooflineCostModel(model="llama-3-8b", tp=1).allreduce_time_s(32) == 0
    tp8 = RooflineCostModel(gpu="H100", model="llama-3-70b", tp=8)
    assert tp8.allreduce_time_s(32) > h100.allreduce_time_s(32)  # more ring hops, same message
    with pytest.raises(ValueError, match="does not fit"):
        RooflineCostModel(gpu="H100", model="llama-3-70b", tp=1).kv_capacity_tokens()


def test_moe_active_params_and_expert_reads() -> None:
    spec = MODELS["mixtral-8x7b"]
    assert spec.active_params == pytest.approx(46.7e9 - 45.1e9 + 45.1e9 * 2 / 8)
    # One token reads 2 of 8 experts; a big batch reads (almost) all of them.
    assert spec.weight_bytes_read(1) == pytest.approx(spec.active_params * 2)
    assert spec.weight_bytes_read(256) == pytest.approx(spec.total_params * 2, rel=1e-6)


@pytest.mark.parametrize(
    ("gpu", "model", "tp", "n", "ctx"),
    [
        ("H100", "llama-3-8b", 1, 8, 8 * 500),
        ("H100", "llama-3-8b", 1, 256, 256 * 3000),
        ("A100", "mixtral-8x7b", 2, 64, 0),
    ],
)
def test_roofline_closed_form_matches_step_sum(gpu: str, model: str, tp: int, n: int, ctx: int) -> None:
    cost = RooflineCostModel(gpu=gpu, model=model, tp=tp)
    for k in (1, 7, 300):
        stepwise = sum(cost.step_time_s(StepShape(num_decodes=n, decode_context_sum=ctx + j * n)) for j in range(k))
        assert cost.decode_run_time_s(n, ctx, k) == pytest.approx(stepwise, rel=1e-9)


def test_generic_fallback_sums_models_without_closed_form() -> None:
    class Quadratic:
        name = "quadratic"

        def step_time_s(self, shape: StepShape) -> float:
            return 1e-3 + 1e-9 * shape.decode_context_sum**2

    class Affine:
        name = "affine"

        def step_time_s(self, shape: StepShape) -> float:
            return 2e-3 + 1e-6 * shape.decode_context_sum

    for model in (Quadratic(), Affine()):
        stepwise = sum(model.step_time_s(StepShape(num_decodes=3, decode_context_sum=100 + 3 * j)) for j in range(11))
        assert decode_run_time_s(model, 3, 100, 11) == pytest.approx(stepwise, rel=1e-12)
    linear = LinearCostModel(a=0.01, d=0.001, e=1e-6)
    assert linear.decode_run_time_s(4, 1000, 5) == pytest.approx(
        sum(linear.step_time_s(StepShape(num_decodes=4, decode_context_sum=1000 + 4 * j)) for j in range(5))
    )
    with pytest.raises(ValueError):
        LinearCostModel(a=-1.0)

"""The profiled cost model: the fit, persistence, CPU sharing, the serving fit, and step shapes read from the engine."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from router.trace import TraceRequest
from sim.config import PoolConfig, SimConfig
from sim.cost import StepShape, decode_run_time_s
from sim.cost_profiled import FEATURES, ProfiledCostModel, ServingSample, fit_serving, fit_step_times
from sim.profile import GridPoint, ProfileConfig, measure_grid, step_shape
from sim.simulator import run

TRUE = {
    "intercept": 7e-4,
    "num_prefill_tokens": 8e-6,
    "prefill_attn_work": 2e-9,
    "num_decodes": 2.5e-5,
    "decode_context_sum": 1.5e-7,
}


def _shapes(num: int, seed: int) -> list[StepShape]:
    rng = random.Random(seed)
    shapes = []
    for _ in range(num):
        chunk, context = rng.choice((0, 16, 64, 256)), rng.choice((0, 64, 320))
        batch = rng.choice((0, 1, 8, 32))
        shapes.append(
            StepShape(
                num_prefill_tokens=chunk,
                prefill_attn_work=chunk * (context + chunk),
                num_decodes=batch,
                decode_context_sum=batch * rng.randint(16, 400),
            )
        )
    return shapes


def test_fit_recovers_known_coefficients_and_scores_heldout_shapes() -> None:
    truth = ProfiledCostModel(coefficients=TRUE)
    shapes = _shapes(120, seed=1)
    rng = random.Random(2)
    times = [truth.step_time_s(s) * rng.uniform(0.98, 1.02) for s in shapes]
    heldout = [i % 5 == 0 for i in range(len(shapes))]
    coefficients, report = fit_step_times(shapes, times, heldout=heldout)
    assert set(coefficients) == set(FEATURES)
    for name in ("intercept", "num_prefill_tokens", "num_decodes"):
        assert coefficients[name] == pytest.approx(TRUE[name], rel=0.15)
    assert report.num_train == 96 and report.num_heldout == 24
    assert report.r2 > 0.98
    assert report.heldout_mean_rel_error < 0.03
    assert report.heldout_max_rel_error < 0.1


def test_fit_never_goes_negative() -> None:
    # Times that fall with the decode count would need a negative slope; the fit clamps it at zero.
    shapes = [StepShape(num_decodes=b, decode_context_sum=b * 10) for b in range(1, 12)]
    times = [2e-3 - 1e-5 * b for b in range(1, 12)]
    coefficients, _ = fit_step_times(shapes, times)
    assert all(v >= 0 for v in coefficients.values())
    model = ProfiledCostModel(coefficients=coefficients)
    assert model.step_time_s(StepShape(num_decodes=10_000)) > 0


@pytest.mark.parametrize(
    ("shapes", "times", "match"),
    [
        ([StepShape()] * 3, [1e-3] * 2, "3 shapes but 2 times"),
        ([StepShape()] * 6, [1e-3] * 5 + [0.0], "positive"),
        ([StepShape()] * 3, [1e-3] * 3, "at least 5"),
    ],
)
def test_fit_rejects_bad_input(shapes, times, match) -> None:
    with pytest.raises(ValueError, match=match):
        fit_step_times(shapes, times)


def test_save_load_round_trip_and_bad_files(tmp_path: Path) -> None:
    model = ProfiledCostModel(
        coefficients=TRUE,
        contention_factors={1: 1.0, 2: 1.1, 4: 2.0},
        serving_overhead={"intercept": 1e-3, "num_decodes": 4e-4},
        request_overhead_s=0.01,
        metadata={"fit": {"r2": 0.9}},
    )
    path = model.save(tmp_path / "p.json")
    loaded = ProfiledCostModel.load(path)
    assert loaded == model
    shape = StepShape(num_prefill_tokens=64, prefill_attn_work=64 * 64, num_decodes=3, decode_context_sum=300)
    assert loaded.step_time_s(shape) == model.step_time_s(shape)
    with pytest.raises(ValueError, match="not found"):
        ProfiledCostModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ProfiledCostModel.load(tmp_path / "bad.json")
    (tmp_path / "roofline.json").write_text(json.dumps({"kind": "roofline"}))
    with pytest.raises(ValueError, match="not a profiled cost model"):
        ProfiledCostModel.load(tmp_path / "roofline.json")
    with pytest.raises(ValueError, match="missing coefficients"):
        ProfiledCostModel(coefficients={"intercept": 1e-3})
    with pytest.raises(ValueError, match=">= 0"):
        ProfiledCostModel(coefficients={**TRUE, "num_decodes": -1.0})


def test_serving_overhead_adds_per_step_and_per_token_time() -> None:
    engine = ProfiledCostModel(coefficients=TRUE)
    served = ProfiledCostModel(coefficients=TRUE, serving_overhead={"intercept": 1e-3, "num_decodes": 5e-4})
    shape = StepShape(num_decodes=8, decode_context_sum=800)
    assert served.step_time_s(shape) == pytest.approx(engine.step_time_s(shape) + 1e-3 + 8 * 5e-4)


def test_decode_run_closed_form_matches_summing_steps() -> None:
    model = ProfiledCostModel(coefficients=TRUE, serving_overhead={"intercept": 1e-3, "num_decodes": 5e-4})
    n, context, steps = 7, 700, 40
    summed = sum(model.step_time_s(StepShape(num_decodes=n, decode_context_sum=context + k * n)) for k in range(steps))
    assert model.decode_run_time_s(n, context, steps) == pytest.approx(summed)
    assert decode_run_time_s(model, n, context, steps) == pytest.approx(summed)
    assert model.decode_run_time_s(n, context, 0) == 0.0


def test_contention_interpolates_and_extrapolates() -> None:
    model = ProfiledCostModel(coefficients=TRUE, contention_factors={1: 1.0, 2: 1.2, 4: 2.0})
    assert model.contention(0) == model.contention(1) == 1.0
    assert model.contention(2) == 1.2
    assert model.contention(3) == pytest.approx(1.6)
    assert model.contention(8) == pytest.approx(4.0)  # time-slicing twice the processes over the same cores
    with pytest.raises(ValueError, match="contention"):
        ProfiledCostModel(coefficients=TRUE, contention_factors={0: 1.0})


def test_fit_serving_recovers_overheads_and_sharing() -> None:
    engine = ProfiledCostModel(coefficients=TRUE)
    per_step, per_token, request = 2e-3, 6e-4, 9e-3
    sharing = {1: 1.0, 2: 1.3, 4: 2.5}

    def tpot(k: int, b: int) -> float:
        shape = StepShape(num_decodes=b, decode_context_sum=b * (64 + 32))
        return sharing[k] * (engine.step_time_s(shape) + per_step + per_token * b)

    prefill = StepShape(num_prefill_tokens=64, prefill_attn_work=64 * 64)
    ttft = request + engine.step_time_s(prefill) + per_step
    samples = [
        ServingSample(num_workers=k, batch_size=b, prompt_len=64, output_len=64, tpot_s=tpot(k, b), ttft_s=ttft)
        for k in sharing
        for b in (1, 4, 8, 16)
    ]
    served = fit_serving(engine, samples)
    assert served.serving_overhead["intercept"] == pytest.approx(per_step, rel=0.05)
    assert served.serving_overhead["num_decodes"] == pytest.approx(per_token, rel=0.05)
    assert served.request_overhead_s == pytest.approx(request, rel=0.05)
    for k, factor in sharing.items():
        assert served.contention(k) == pytest.approx(factor, rel=0.02)
    with pytest.raises(ValueError, match="two or more batch sizes"):
        fit_serving(engine, samples[4:5])


def test_step_shape_counts_single_tokens_as_decodes() -> None:
    batch = [
        SimpleNamespace(num_new_tokens=1, num_computed_tokens=99),
        SimpleNamespace(num_new_tokens=1, num_computed_tokens=9),
        SimpleNamespace(num_new_tokens=32, num_computed_tokens=64),
    ]
    assert step_shape(batch) == StepShape(
        num_prefill_tokens=32, prefill_attn_work=32 * 96, num_decodes=2, decode_context_sum=100 + 10
    )


def test_measure_grid_times_the_steps_it_asked_for(tiny_llama: Path) -> None:
    config = ProfileConfig(model=str(tiny_llama), repeats=1, max_contention_workers=1)
    grid = [
        GridPoint(kind="prefill", chunk_len=32, prefill_context=64),
        GridPoint(kind="decode", batch_size=4, decode_context=16),
        GridPoint(kind="mixed", batch_size=2, decode_context=16, chunk_len=48, prefill_context=0),
    ]
    measured = measure_grid(config, grid=grid)
    by_kind: dict[str, list[StepShape]] = {}
    for point, shape, seconds in measured:
        assert seconds > 0
        by_kind.setdefault(point.kind, []).append(shape)
    assert by_kind["prefill"] == [StepShape(num_prefill_tokens=32, prefill_attn_work=32 * 96)]
    decodes = by_kind["decode"]
    assert len(decodes) == 4  # one per timed decode step, contexts growing by one token each
    assert all(s.num_decodes == 4 and s.num_prefill_tokens == 0 for s in decodes)
    assert [s.decode_context_sum for s in decodes] == [4 * 17, 4 * 18, 4 * 19, 4 * 20]
    (mixed,) = by_kind["mixed"]
    assert (mixed.num_decodes, mixed.num_prefill_tokens, mixed.prefill_attn_work) == (2, 48, 48 * 48)


def test_simulator_stretches_steps_while_other_workers_are_busy(tmp_path: Path) -> None:
    coefficients = {**dict.fromkeys(FEATURES, 0.0), "intercept": 0.01}
    requests = tuple(TraceRequest(arrival_s=i * 1e-3, prompt_len=16, output_len=5) for i in range(2))

    def e2e(factors: dict[int, float]) -> list[float]:
        path = ProfiledCostModel(coefficients=coefficients, contention_factors=factors).save(tmp_path / "p.json")
        config = SimConfig(
            requests=requests,
            pools=(PoolConfig(role="mixed", num_workers=2, kv_blocks=64),),
            policy="least_outstanding",
            cost_model={"kind": "profiled", "path": str(path)},
        )
        return run(config).e2e_s

    alone, shared = e2e({1: 1.0}), e2e({1: 1.0, 2: 2.0})
    assert alone == pytest.approx([0.05, 0.05])  # five 10 ms steps each, one request per worker
    assert shared[0] > alone[0] and shared[1] > alone[1]
    assert 0.07 < max(shared) <= 0.1  # both busy nearly all the time: most steps take twice as long

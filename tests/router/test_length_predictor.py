"""The online output-length predictor, its histogram sketch, prompt features, evaluate() and Kendall's tau-b."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from router.length_predictor import (
    LabeledRequest,
    LengthPredictor,
    LengthPredictorConfig,
    evaluate,
    kendall_tau_b,
    prompt_bucket,
    prompt_features,
    shape_signature,
)
from router.policy import RouteRequest


def req(
    tenant: str = "a", deployment: str = "chat", adapter: str | None = None, prompt: int = 100, max_tokens: int = 4096
) -> RouteRequest:
    return RouteRequest(
        request_id="r",
        deployment=deployment,
        tenant=tenant,
        adapter=adapter,
        num_prompt_tokens_estimate=prompt,
        max_tokens=max_tokens,
    )


def lognormal_len(rng: random.Random, median: float, sigma: float = 0.3) -> int:
    return max(1, round(median * math.exp(rng.gauss(0.0, sigma))))


def planted(rng: random.Random, n: int) -> list[LabeledRequest]:
    """Tenant a answers in ~50 tokens, tenant b in ~800; prompts are random and carry no signal."""
    samples = []
    for _ in range(n):
        tenant = rng.choice("ab")
        length = lognormal_len(rng, 50 if tenant == "a" else 800)
        samples.append(LabeledRequest(request=req(tenant, prompt=rng.randint(10, 2000)), output_len=length))
    return samples


# --- learning ------------------------------------------------------------------------------------------------------


def test_predicts_the_prior_before_any_data():
    config = LengthPredictorConfig(prior_median_tokens=300, prior_sigma=1.0)
    prediction = LengthPredictor(config).predict(req())
    assert prediction.source == "prior"
    assert prediction.num_observations == 0
    assert prediction.p50 == pytest.approx(300)
    assert prediction.p90 == pytest.approx(300 * math.exp(1.2815515655446004))


def test_learns_a_planted_per_tenant_length_distribution():
    rng = random.Random(0)
    predictor = LengthPredictor()
    for sample in planted(rng, 2000):
        predictor.observe(sample.request, sample.output_len)
    a, b = predictor.predict(req("a")), predictor.predict(req("b"))
    assert a.p50 == pytest.approx(50, rel=0.2)
    assert b.p50 == pytest.approx(800, rel=0.2)
    # lognormal sigma 0.3: p90 is ~1.47x the median
    assert b.p90 == pytest.approx(800 * math.exp(0.3 * 1.2816), rel=0.2)
    assert a.source.startswith("tenant=a|deployment=chat|adapter=-")
    metrics = evaluate(predictor, planted(rng, 500))
    # Two equal groups, perfectly separated, no order within a group: tau-b is ~0.5 (0.71 if the
    # predictions tied within each group); a predictor that ignored the tenant would sit near 0.
    assert metrics["kendall_tau"] > 0.45
    assert 0.8 <= metrics["coverage_p90"] <= 0.97


def test_prequential_evaluation_learns_while_it_scores():
    rng = random.Random(1)
    predictor = LengthPredictor()
    evaluate(predictor, planted(rng, 3000), learn=True)
    assert predictor.predict(req("b")).p50 == pytest.approx(800, rel=0.2)
    untouched = LengthPredictor()
    evaluate(untouched, planted(rng, 50))
    assert untouched.num_keys == 0


def test_predictions_are_clipped_to_max_tokens():
    predictor = LengthPredictor(LengthPredictorConfig(min_observations=4))
    for _ in range(20):
        predictor.observe(req("b"), 800)
    capped = predictor.predict(req("b", max_tokens=64))
    assert (capped.p50, capped.p90) == (64, 64)
    assert LengthPredictor().predict(req(max_tokens=16)).p90 == 16
    assert predictor.predict(req("b")).p50 == pytest.approx(800, rel=0.1)


def test_backs_off_to_coarser_keys_for_unseen_combinations():
    predictor = LengthPredictor(LengthPredictorConfig(min_observations=8))
    for _ in range(10):
        predictor.observe(req("a", prompt=100), 40)
        predictor.observe(req("b", prompt=3000), 900)
    # unseen prompt bucket for tenant a: tenant-level key answers
    assert predictor.predict(req("a", prompt=20000)).source == "tenant=a|deployment=chat|adapter=-"
    # unseen tenant, seen deployment and prompt bucket
    unseen_tenant = predictor.predict(req("c", prompt=3000))
    assert unseen_tenant.source == f"deployment=chat|prompt_bucket={prompt_bucket(3000)}"
    assert unseen_tenant.p50 == pytest.approx(900, rel=0.1)
    # unseen deployment and prompt bucket: the global key
    assert predictor.predict(req("c", deployment="other", prompt=5)).source == "*"
    # an adapter is its own key
    assert (
        predictor.predict(req("a", adapter="sql", prompt=100)).source
        == f"deployment=chat|prompt_bucket={prompt_bucket(100)}"
    )


def test_a_key_answers_only_with_enough_observations():
    predictor = LengthPredictor(LengthPredictorConfig(min_observations=5, backoff=(("tenant",), ())))
    for _ in range(4):
        predictor.observe(req("a"), 10)
    assert predictor.predict(req("a")).source == "prior"
    predictor.observe(req("a"), 10)
    assert predictor.predict(req("a")).source == "tenant=a"


def test_prompt_features_add_a_more_specific_shape_key():
    predictor = LengthPredictor(LengthPredictorConfig(min_observations=5))
    short_q = prompt_features("Is 7 prime? Answer yes or no?")
    essay = prompt_features("Write an essay about rivers, in detail.")
    for _ in range(10):
        predictor.observe(req("a"), 3, short_q)
        predictor.observe(req("a"), 600, essay)
    assert predictor.predict(req("a"), short_q).p50 < 5
    assert predictor.predict(req("a"), essay).p50 == pytest.approx(600, rel=0.1)
    assert "shape=" in predictor.predict(req("a"), essay).source
    assert "shape=" not in predictor.predict(req("a")).source  # no features: the shape level is skipped


def test_global_only_config_is_a_running_global_quantile():
    predictor = LengthPredictor(LengthPredictorConfig(backoff=((),), min_observations=1))
    for length in range(1, 101):
        predictor.observe(req(tenant=str(length)), length)
    prediction = predictor.predict(req("new"))
    assert prediction.source == "*"
    assert prediction.p50 == pytest.approx(50, rel=0.15)
    assert prediction.p90 == pytest.approx(90, rel=0.15)
    assert predictor.num_keys == 1


def test_forgets_old_traffic_after_the_weight_cap():
    config = LengthPredictorConfig(min_observations=4, max_weight_per_key=40, backoff=((),))
    predictor = LengthPredictor(config)
    for _ in range(200):
        predictor.observe(req(), 1000)
    for _ in range(60):
        predictor.observe(req(), 10)
    assert predictor.predict(req()).p50 == pytest.approx(10, rel=0.15)


def test_memory_is_bounded_by_the_lru_key_cap():
    config = LengthPredictorConfig(max_keys=50, min_observations=1)
    predictor = LengthPredictor(config)
    rng = random.Random(2)
    for i in range(2000):
        predictor.observe(req(f"t{i}", prompt=rng.randint(1, 10**5)), rng.randint(1, 10**6))
    assert predictor.num_keys <= 50
    # the most recently updated keys survive
    assert predictor.predict(req("t1999")).source.startswith("tenant=t1999")
    bins = [len(entry["bins"]) for entry in predictor.to_dict()["keys"]]
    assert max(bins) <= math.log2(config.max_tracked_tokens) * config.bins_per_octave + 1


def test_round_trips_through_json():
    rng = random.Random(3)
    predictor = LengthPredictor(LengthPredictorConfig(min_observations=4, max_keys=40))
    for sample in planted(rng, 300):
        predictor.observe(sample.request, sample.output_len, prompt_features("hi?"))
    restored = LengthPredictor.from_dict(json.loads(json.dumps(predictor.to_dict())))
    assert restored.config == predictor.config
    assert restored.to_dict() == predictor.to_dict()
    for sample in planted(rng, 50):
        assert restored.predict(sample.request) == predictor.predict(sample.request)
    # LRU order survives: the same keys are evicted next
    predictor.observe(req("z"), 5)
    restored.observe(req("z"), 5)
    assert restored.to_dict() == predictor.to_dict()


def test_from_dict_rejects_unknown_versions_and_malformed_snapshots():
    with pytest.raises(ValueError, match="version"):
        LengthPredictor.from_dict({"version": 99})
    with pytest.raises(ValueError, match="malformed"):
        LengthPredictor.from_dict({"version": 1, "config": {}})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"prior_median_tokens": 0}, "prior_median_tokens"),
        ({"prior_sigma": -1}, "prior_sigma"),
        ({"min_observations": 0}, "min_observations"),
        ({"max_weight_per_key": 10, "min_observations": 8}, "max_weight_per_key"),
        ({"bins_per_octave": 0}, "bins_per_octave"),
        ({"backoff": ()}, "at least one level"),
        ({"backoff": (("tenant", "colour"),)}, "distinct names"),
        ({"backoff": (("tenant",), ("tenant",))}, "distinct"),
        ({"max_keys": 2}, "max_keys"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        LengthPredictorConfig(**overrides)


def test_observe_rejects_negative_lengths_and_treats_zero_as_one():
    predictor = LengthPredictor(LengthPredictorConfig(min_observations=1, backoff=((),)))
    with pytest.raises(ValueError, match="output_len"):
        predictor.observe(req(), -1)
    predictor.observe(req(), 0)
    assert 1 <= predictor.predict(req()).p50 < 1.2


# --- pieces --------------------------------------------------------------------------------------------------------


def test_prompt_features_and_shape_signature():
    features = prompt_features("What is 12 + 30?  \n")
    assert features["ends_with_question"] == 1.0
    assert features["digit_ratio"] == pytest.approx(4 / 12)
    assert features["has_code"] == 0.0
    assert shape_signature(features) == "q1d2c0hn"
    assert shape_signature(prompt_features("Explain ```x``` step by step")) == "q0d0c1hl"
    assert shape_signature(prompt_features("tl;dr please")) == "q0d0c0hs"
    assert prompt_features("") == {"ends_with_question": 0.0, "digit_ratio": 0.0, "has_code": 0.0, "length_hint": 0.0}


def test_prompt_bucket_is_log2():
    assert [prompt_bucket(n) for n in (0, 1, 2, 3, 4, 1000, 1024)] == [0, 0, 1, 1, 2, 9, 10]
    assert prompt_bucket(1024, bins_per_octave=2) == 20


# --- Kendall's tau-b -----------------------------------------------------------------------------------------------


def test_kendall_tau_perfect_reversed_and_undefined():
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [40, 30, 20, 10]) == -1.0
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendall_tau_b([1], [1]))
    with pytest.raises(ValueError, match="same length"):
        kendall_tau_b([1, 2], [1])


def test_kendall_tau_b_with_ties_matches_the_hand_computed_value():
    # x = [1, 1, 2, 3], y = [1, 2, 2, 3]: C = 4, D = 0, one tie only in x, one only in y.
    # tau_b = 4 / sqrt((4 + 0 + 1) * (4 + 0 + 1)) = 0.8
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    # one discordant pair among six: (C - D) / n0 = (5 - 1) / 6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def _brute_tau_b(x, y):
    concordant = discordant = only_x = only_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            only_x += 1
        elif dy == 0:
            only_y += 1
        elif dx * dy > 0:
            concordant += 1
        else:
            discordant += 1
    n_x = concordant + discordant + only_y
    n_y = concordant + discordant + only_x
    return (concordant - discordant) / math.sqrt(n_x * n_y)


def test_kendall_tau_b_matches_the_quadratic_definition_on_random_tied_data():
    rng = random.Random(4)
    for _ in range(200):
        n = rng.randint(2, 60)
        x = [rng.randint(0, 6) for _ in range(n)]
        y = [rng.randint(0, 6) for _ in range(n)]
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert kendall_tau_b(x, y) == pytest.approx(_brute_tau_b(x, y), abs=1e-12)


def test_kendall_tau_b_handles_thousands_of_points_quickly():
    rng = random.Random(5)
    x = [rng.random() for _ in range(20000)]
    y = [v + rng.gauss(0, 0.1) for v in x]
    assert 0.6 < kendall_tau_b(x, y) < 0.9

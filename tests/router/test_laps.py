"""LAPS: the learned short/long threshold and the worker partition the `raylane` policy scores with."""

from __future__ import annotations

import random

import pytest

from router.laps import (
    LapsConfig,
    LapsPrefillScorer,
    LengthSplitter,
    PrefillPartitioner,
    num_long_workers,
)
from router.policy import ClusterView, LoadScorer, RouteRequest, WeightedPolicy, WeightedTerm, WorkerView


def feed(splitter: LengthSplitter, lengths) -> None:
    for n in lengths:
        splitter.observe(n)


def uniform(rng: random.Random, lo: int, hi: int, count: int) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(count)]


def request(n: int, rid: str = "t/r") -> RouteRequest:
    return RouteRequest(request_id=rid, deployment="chat", tenant="t", num_prompt_tokens_estimate=n)


def prefill_pool(num: int, **load) -> list[WorkerView]:
    return [WorkerView(worker_id=f"p{i}", deployment="chat", role="prefill", **load) for i in range(num)]


# ---- threshold ---------------------------------------------------------------------------------------------------


def test_quantile_threshold_converges_to_the_planted_split():
    splitter = LengthSplitter(LapsConfig(split="quantile", quantile=0.75, hysteresis=0.02))
    feed(splitter, uniform(random.Random(0), 100, 1000, 20_000))
    assert splitter.threshold == pytest.approx(775, rel=0.04)  # the 0.75 quantile of U[100, 1000]


def test_token_balance_threshold_converges_to_the_planted_split():
    splitter = LengthSplitter(LapsConfig(split="token_balance", short_token_share=0.5, hysteresis=0.02))
    feed(splitter, uniform(random.Random(1), 100, 1000, 20_000))
    # Half the tokens of U[a, b] lie below sqrt((a^2 + b^2) / 2).
    assert splitter.threshold == pytest.approx(((100**2 + 1000**2) / 2) ** 0.5, rel=0.04)
    assert splitter.long_token_share() == pytest.approx(0.5, abs=0.04)


def test_bimodal_split_keeps_the_modes_apart_and_follows_drift():
    rng = random.Random(2)
    splitter = LengthSplitter(LapsConfig(quantile=0.65, half_life=500))  # below the 70% short share
    shorts_then_longs = [rng.randint(50, 200) if rng.random() < 0.7 else rng.randint(3000, 8000) for _ in range(5000)]
    feed(splitter, shorts_then_longs)
    assert 150 <= splitter.threshold <= 200  # the 0.65 / 0.7 quantile of U[50, 200], within the hysteresis band
    assert splitter.classify(100) == "short" and splitter.classify(3000) == "long"
    feed(splitter, uniform(rng, 20_000, 40_000, 5000))  # traffic moves to much longer prompts
    assert splitter.threshold > 20_000


def test_threshold_stays_at_its_initial_value_until_min_samples():
    splitter = LengthSplitter(LapsConfig(initial_threshold=300, min_samples=50, recompute_every=1))
    feed(splitter, [5000] * 49)
    assert splitter.threshold == 300
    splitter.observe(5000)
    assert splitter.threshold > 4000


def test_hysteresis_keeps_a_stationary_threshold_still():
    lengths = uniform(random.Random(3), 100, 1000, 20_000)
    still = LengthSplitter(LapsConfig(hysteresis=0.15, half_life=300, recompute_every=4))
    jumpy = LengthSplitter(LapsConfig(hysteresis=0.0, half_life=300, recompute_every=4))
    feed(still, lengths)
    feed(jumpy, lengths)
    assert still.num_threshold_changes <= 3
    assert jumpy.num_threshold_changes > 20 * still.num_threshold_changes


# ---- in space ----------------------------------------------------------------------------------------------------


def test_num_long_workers_is_proportional_with_one_of_each_and_hysteresis():
    assert num_long_workers(10, 0.3, None, 0.25) == 3
    assert num_long_workers(10, 0.0, None, 0.25) == 1  # shorts never take the last long worker
    assert num_long_workers(10, 1.0, None, 0.25) == 9
    assert num_long_workers(1, 0.5, None, 0.25) == 0  # one worker serves both
    assert num_long_workers(10, 0.37, 3, 0.25) == 3  # 3.7 is within 0.75 of 3: stay
    assert num_long_workers(10, 0.38, 3, 0.25) == 4


def partitioned(splitter: LengthSplitter, view: dict[str, ClusterView]) -> WeightedPolicy:
    """Least loaded within the request's length class, as the `raylane` policy weighs the LAPS term."""
    scorer = LapsPrefillScorer(splitter, pool=lambda req, w: view["now"].candidates(w.deployment, w.role))
    return WeightedPolicy([WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=scorer, weight=100.0)])


def test_spatial_partition_is_proportional_to_token_share_and_disjoint():
    rng = random.Random(4)
    # 75% short prompts of ~100 tokens, 25% long of ~1000: longs carry ~77% of tokens.
    splitter = LengthSplitter(LapsConfig(initial_threshold=500, min_samples=10**9))  # a fixed threshold
    feed(splitter, [rng.randint(80, 120) if rng.random() < 0.75 else rng.randint(900, 1100) for _ in range(4000)])
    share = splitter.long_token_share()
    assert share == pytest.approx(0.77, abs=0.04)
    pool = prefill_pool(10)
    decode = [WorkerView(worker_id="d0", deployment="chat", role="decode")]
    view = {"now": ClusterView(workers={"chat": [*pool, *decode]})}
    policy = partitioned(splitter, view)
    served: dict[str, set[str]] = {"short": set(), "long": set()}
    loads = {w.worker_id: 0 for w in pool}
    for i in range(400):
        length_class = "short" if i % 2 else "long"
        n = 100 if length_class == "short" else 1000
        busy = (WorkerView(worker_id=w, deployment="chat", role="prefill", num_running=k) for w, k in loads.items())
        view["now"] = ClusterView(workers={"chat": [*busy, *decode]})
        decision = policy.route(request(n, f"t/r{i}"), view["now"])
        served[length_class].add(decision.prefill_worker_id)
        loads[decision.prefill_worker_id] += 1
        assert decision.worker_id == "d0"
    assert served["short"].isdisjoint(served["long"])
    assert len(served["long"]) == round(10 * share)
    assert len(served["short"]) == 10 - round(10 * share)


def test_mixed_pools_are_not_partitioned_by_default():
    splitter = LengthSplitter(LapsConfig(initial_threshold=100))
    mixed = [WorkerView(worker_id=f"m{i}", deployment="chat", role="mixed", num_running=i) for i in range(3)]
    view = {"now": ClusterView(workers={"chat": mixed})}
    assert partitioned(splitter, view).route(request(5000), view["now"]).worker_id == "m0"


def test_scorer_partitions_through_a_weighted_policy():
    splitter = LengthSplitter(LapsConfig(initial_threshold=500))
    pool = prefill_pool(4)
    cluster = ClusterView(workers={"chat": [*pool, WorkerView(worker_id="d0", deployment="chat", role="decode")]})
    scorer = LapsPrefillScorer(splitter, pool=lambda req, w: cluster.candidates(w.deployment, w.role))
    policy = WeightedPolicy([WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=scorer, weight=100.0)])
    assert policy.route(request(50), cluster).prefill_worker_id == "p0"
    assert policy.route(request(5000), cluster).prefill_worker_id == "p3"  # no share learned yet: one long worker
    assert scorer.score(request(5000), WorkerView(worker_id="d0", deployment="chat", role="decode")) == 0.0


def test_partitioner_moves_one_worker_at_a_time():
    partitioner = PrefillPartitioner(LapsConfig(partition_hysteresis=0.0))
    pool = prefill_pool(6)
    assert partitioner.members(pool, "long", 0.34) == ["p4", "p5"]
    assert partitioner.members(pool, "long", 0.5) == ["p3", "p4", "p5"]
    assert partitioner.members(pool, "short", 0.5) == ["p0", "p1", "p2"]
    assert partitioner.members(pool[:1], "long", 0.5) == ["p0"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("split", "median"),
        ("quantile", 1.0),
        ("short_token_share", 0.0),
        ("min_samples", 0),
        ("half_life", 0.0),
        ("hysteresis", -0.1),
        ("partition_hysteresis", float("inf")),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        LapsConfig(**{field: value})

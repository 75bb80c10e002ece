"""Baseline policies (round-robin, least-outstanding, power-of-two, SGLang-style prefix cache) and the filter → score
→ pick WeightedPolicy."""

from __future__ import annotations

import logging
import random

import pytest

from router.baselines import (
    LeastOutstandingPolicy,
    PowerOfTwoPolicy,
    PrefixCacheConfig,
    PrefixCachePolicy,
    RoundRobinPolicy,
    num_outstanding,
)
from router.policy import (
    AdapterAffinityScorer,
    ClusterView,
    KvPressureScorer,
    LeastLoadedPolicy,
    LoadScorer,
    NoCapacityError,
    Policy,
    PromptHashes,
    RouteRequest,
    WeightedPolicy,
    WeightedTerm,
    WorkerView,
)
from workers.engine.block_manager import prefix_block_hashes


def worker(worker_id: str, role: str = "mixed", deployment: str = "chat", **load) -> WorkerView:
    return WorkerView(worker_id=worker_id, deployment=deployment, role=role, **load)


def request(deployment: str = "chat", adapter: str | None = None, request_id: str = "t/r1") -> RouteRequest:
    return RouteRequest(request_id=request_id, deployment=deployment, tenant="t", adapter=adapter)


def view(*workers: WorkerView) -> ClusterView:
    grouped: dict[str, list[WorkerView]] = {}
    for w in workers:
        grouped.setdefault(w.deployment, []).append(w)
    return ClusterView(workers=grouped)


def default_weighted() -> WeightedPolicy:
    return WeightedPolicy([WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=AdapterAffinityScorer(), weight=0.5)])


ALL_POLICIES = [RoundRobinPolicy, LeastOutstandingPolicy, PowerOfTwoPolicy, PrefixCachePolicy, default_weighted]


# --- round-robin ---------------------------------------------------------------------------------------------------


def test_round_robin_cycles_through_the_pool_in_worker_id_order_ignoring_load():
    cluster = view(worker("c-2"), worker("c-0", num_running=9), worker("c-1"))
    policy = RoundRobinPolicy()
    picks = [policy.route(request(), cluster).worker_id for _ in range(7)]
    assert picks == ["c-0", "c-1", "c-2", "c-0", "c-1", "c-2", "c-0"]


def test_round_robin_keeps_a_separate_cursor_per_deployment_and_role():
    cluster = view(
        worker("a-0"),
        worker("a-1"),
        worker("p-0", role="prefill", deployment="pd"),
        worker("p-1", role="prefill", deployment="pd"),
        worker("d-0", role="decode", deployment="pd"),
        worker("d-1", role="decode", deployment="pd"),
        worker("d-2", role="decode", deployment="pd"),
    )
    policy = RoundRobinPolicy()
    assert policy.route(request(), cluster).worker_id == "a-0"
    pd = [policy.route(request("pd"), cluster) for _ in range(3)]
    assert [(d.prefill_worker_id, d.worker_id) for d in pd] == [("p-0", "d-0"), ("p-1", "d-1"), ("p-0", "d-2")]
    assert policy.route(request(), cluster).worker_id == "a-1"


def test_round_robin_skips_an_unhealthy_worker_without_repeating_the_others():
    policy = RoundRobinPolicy()
    healthy = view(worker("c-0"), worker("c-1"), worker("c-2"))
    assert policy.route(request(), healthy).worker_id == "c-0"
    c1_down = view(worker("c-0"), worker("c-1", is_healthy=False), worker("c-2"))
    assert policy.route(request(), c1_down).worker_id == "c-2"
    assert policy.route(request(), healthy).worker_id == "c-0"


def test_round_robin_scores_are_turns_until_each_worker_is_picked():
    policy = RoundRobinPolicy()
    cluster = view(worker("c-0"), worker("c-1"), worker("c-2"))
    policy.route(request(), cluster)
    assert policy.route(request(), cluster).scores == {"c-1": 0.0, "c-2": 1.0, "c-0": 2.0}


# --- least-outstanding ---------------------------------------------------------------------------------------------


def test_least_outstanding_picks_the_fewest_running_plus_waiting_plus_inflight():
    cluster = view(
        worker("c-0", num_running=1, num_waiting=1),
        worker("c-1", num_running=1, num_inflight=2),
        worker("c-2", num_waiting=1, kv_usage=0.99),
    )
    decision = LeastOutstandingPolicy().route(request(), cluster)
    assert decision.worker_id == "c-2"
    assert decision.scores == {"c-0": 2.0, "c-1": 3.0, "c-2": 1.0}


def test_least_outstanding_counts_inflight_requests_the_stats_have_not_seen_yet():
    stale_idle = worker("c-0", num_inflight=3)
    busy = worker("c-1", num_running=2)
    assert LeastOutstandingPolicy().route(request(), view(stale_idle, busy)).worker_id == "c-1"
    assert num_outstanding(stale_idle) == 3


def test_least_outstanding_breaks_ties_by_worker_id_and_ignores_kv_usage():
    cluster = view(worker("c-2"), worker("c-1", kv_usage=0.9), worker("c-3"))
    assert LeastOutstandingPolicy().route(request(), cluster).worker_id == "c-1"


# --- power of two choices ------------------------------------------------------------------------------------------


def test_power_of_two_is_deterministic_given_the_seed():
    cluster = view(*(worker(f"c-{i}", num_running=i % 3) for i in range(8)))
    runs = []
    for _ in range(2):
        policy = PowerOfTwoPolicy(rng=random.Random(42))
        runs.append([policy.route(request(), cluster).worker_id for _ in range(30)])
    assert runs[0] == runs[1]
    by_seed = PowerOfTwoPolicy(seed=42)
    assert [by_seed.route(request(), cluster).worker_id for _ in range(30)] == runs[0]


def test_power_of_two_does_not_depend_on_the_order_the_view_lists_workers():
    workers = [worker(f"c-{i}", num_waiting=i) for i in range(6)]
    forward, backward = PowerOfTwoPolicy(seed=3), PowerOfTwoPolicy(seed=3)
    for _ in range(20):
        assert forward.route(request(), view(*workers)) == backward.route(request(), view(*reversed(workers)))


def test_power_of_two_never_picks_the_more_loaded_of_its_two_samples():
    cluster = view(*(worker(f"c-{i}", num_running=i) for i in range(10)))
    policy = PowerOfTwoPolicy(seed=7)
    sampled_pairs = set()
    for _ in range(200):
        decision = policy.route(request(), cluster)
        assert len(decision.scores) == 2
        assert decision.scores[decision.worker_id] == min(decision.scores.values())
        sampled_pairs.add(frozenset(decision.scores))
    assert len(sampled_pairs) > 20  # it really samples, not always the same pair


def test_power_of_two_with_one_candidate_takes_it():
    decision = PowerOfTwoPolicy(seed=0).route(
        request(), view(worker("c-0", num_running=5), worker("c-1", is_healthy=False))
    )
    assert decision.worker_id == "c-0"
    assert decision.scores == {"c-0": 5.0}


# --- weighted policy -----------------------------------------------------------------------------------------------


def test_weighted_policy_with_load_and_adapter_terms_matches_least_loaded_on_plain_load():
    cluster = view(
        worker("c-0", num_running=2), worker("c-1", num_running=1, kv_usage=0.5), worker("c-2", num_running=1)
    )
    decision = default_weighted().route(request(), cluster)
    assert decision.worker_id == LeastLoadedPolicy().route(request(), cluster).worker_id == "c-2"
    assert decision.scores == {"c-0": 2.0, "c-1": 1.5, "c-2": 1.0}


def test_weighted_policy_trades_load_against_adapter_affinity_by_weight():
    cluster = view(worker("cold", num_running=1), worker("warm", num_running=2, adapters=frozenset({"sql"})))
    light = WeightedPolicy(
        [WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=AdapterAffinityScorer(), weight=0.5)]
    )
    heavy = WeightedPolicy(
        [WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=AdapterAffinityScorer(), weight=3.0)]
    )
    assert light.route(request(adapter="sql"), cluster).worker_id == "cold"
    assert heavy.route(request(adapter="sql"), cluster).worker_id == "warm"


def test_weighted_policy_breaks_full_ties_by_worker_id():
    cluster = view(worker("c-2"), worker("c-0"), worker("c-1"))
    assert default_weighted().route(request(), cluster).worker_id == "c-0"


def test_weighted_policy_predicate_filters_candidates_and_empty_filter_has_no_capacity():
    def has_kv_room(req: RouteRequest, w: WorkerView) -> bool:
        return w.kv_usage < 0.8

    policy = WeightedPolicy([WeightedTerm(scorer=LoadScorer())], predicate=has_kv_room, name="kv_guard")
    cluster = view(worker("full", kv_usage=0.95), worker("busy", num_running=4, kv_usage=0.5))
    decision = policy.route(request(), cluster)
    assert decision.worker_id == "busy"
    assert set(decision.scores) == {"busy"}
    with pytest.raises(NoCapacityError, match="kv_guard filter"):
        policy.route(request(), view(worker("full", kv_usage=0.95)))


def test_weighted_policy_places_disaggregated_requests_on_both_pools():
    cluster = view(
        worker("p-0", role="prefill", num_waiting=3),
        worker("p-1", role="prefill", kv_usage=0.2),
        worker("d-0", role="decode", kv_usage=0.7),
        worker("d-1", role="decode", kv_usage=0.1),
    )
    policy = WeightedPolicy([WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=KvPressureScorer(), weight=2.0)])
    decision = policy.route(request(), cluster)
    assert (decision.prefill_worker_id, decision.worker_id) == ("p-1", "d-1")
    assert decision.scores == pytest.approx({"p-0": 3.0, "p-1": 0.6, "d-0": 2.1, "d-1": 0.3})
    assert decision.reason.startswith("weighted prefill+decode")
    assert "prefill[load=0.2*1+kv=0.2*2]" in decision.reason
    assert "decode[load=0.1*1+kv=0.1*2]" in decision.reason


def test_weighted_policy_logs_one_structured_line_with_candidates_choice_and_reason(caplog):
    cluster = view(worker("c-0", num_running=1), worker("c-1"))
    with caplog.at_level(logging.INFO, logger="router.policy"):
        default_weighted().route(request(adapter="sql"), cluster)
    lines = [r.getMessage() for r in caplog.records if r.name == "router.policy"]
    assert len(lines) == 1
    for part in ("request_id=t/r1", "policy=weighted", "candidates=c-0:1.50,c-1:0.50", "worker=c-1", "reason=weighted"):
        assert part in lines[0]
    assert "mixed[load=0*1+adapter=1*0.5]" in lines[0]


def test_weighted_policy_validates_its_terms():
    with pytest.raises(ValueError, match="at least one"):
        WeightedPolicy([])
    with pytest.raises(ValueError, match="unique"):
        WeightedPolicy([WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=LoadScorer(), weight=2.0)])
    with pytest.raises(ValueError, match="finite and >= 0"):
        WeightedTerm(scorer=LoadScorer(), weight=-1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        WeightedTerm(scorer=LoadScorer(), weight=float("nan"))


def test_weighted_policy_rejects_a_scorer_returning_nan():
    class Broken:
        name = "broken"

        def score(self, request: RouteRequest, worker: WorkerView) -> float:
            return float("nan")

    with pytest.raises(ValueError, match="broken"):
        WeightedPolicy([WeightedTerm(scorer=Broken())]).route(request(), view(worker("c-0")))


# --- prefix cache (SGLang's cache_aware) ----------------------------------------------------------------------------

BS = 4
SYSTEM = list(range(1000, 1032))  # a 32-token shared system prompt: 8 blocks of 4
PROMPT = (*SYSTEM, 7, 8, 9)  # 8 cacheable blocks: the engine computes the last token itself


def cached(tokens, role: str = "mixed", worker_id: str = "c-0", **load) -> WorkerView:
    """A worker whose prefix cache holds the chained hashes of `tokens`' full blocks."""
    hashes = frozenset(prefix_block_hashes(list(tokens), BS))
    return worker(worker_id, role=role, kv_block_size=BS, prefix_block_hashes=hashes, **load)


def prompt_request(tokens=PROMPT, request_id: str = "t/r1") -> RouteRequest:
    return RouteRequest(request_id=request_id, deployment="chat", tenant="t", prompt_token_ids=tuple(tokens))


def test_prefix_cache_goes_to_the_longest_match_over_load_when_it_covers_enough():
    policy = PrefixCachePolicy()
    cluster = view(
        worker("c-0", kv_block_size=BS, num_running=1),
        cached(SYSTEM, worker_id="c-1", num_running=9),
        cached(SYSTEM[:16], worker_id="c-2"),
    )
    decision = policy.route(prompt_request(), cluster)
    assert decision.worker_id == "c-1"  # all 8 blocks, though 9 requests busier than c-2
    assert decision.reason == "prefix_cache mixed mixed:hit=1.00"
    assert decision.scores == {"c-0": 1.0, "c-1": 0.0, "c-2": 0.5}
    # Without it, half the prompt (4 of 8 blocks, > 0.3) still beats the idle worker with nothing cached.
    assert policy.route(prompt_request(), view(cluster.workers["chat"][0], cluster.workers["chat"][2])).worker_id == (
        "c-2"
    )


def test_prefix_cache_below_the_threshold_goes_to_the_least_loaded():
    cluster = view(worker("c-0", kv_block_size=BS, num_running=1), cached(SYSTEM[:8], worker_id="c-1"))
    # 2 of 8 blocks = 0.25: not more than the default 0.3, so load decides (c-1 is idle anyway) ...
    decision = PrefixCachePolicy().route(prompt_request(), cluster)
    assert (decision.worker_id, decision.reason) == ("c-1", "prefix_cache mixed mixed:miss=0.25")
    assert decision.scores == {"c-0": 1.0, "c-1": 0.0}
    busy = view(worker("c-0", kv_block_size=BS), cached(SYSTEM[:8], worker_id="c-1", num_waiting=1))
    assert PrefixCachePolicy().route(prompt_request(), busy).worker_id == "c-0"
    # ... and the threshold is strict: a match must exceed it.
    assert PrefixCachePolicy(PrefixCacheConfig(cache_threshold=0.25)).route(prompt_request(), busy).worker_id == "c-0"
    assert PrefixCachePolicy(PrefixCacheConfig(cache_threshold=0.2)).route(prompt_request(), busy).worker_id == "c-1"
    # A request without token ids or hashes has nothing to match: least loaded.
    assert PrefixCachePolicy().route(request(), busy).reason.endswith("miss=0.00")


@pytest.mark.parametrize(
    ("idle", "hot", "expected"),
    [
        (0, 65, "c-0"),  # 65 apart (> 64) and 65 > 1.5 * 0: imbalanced, shortest queue
        (10, 74, "c-1"),  # only 64 apart: balanced, the cache wins
        (50, 115, "c-0"),  # 65 apart and 115 > 75: imbalanced
        (200, 265, "c-1"),  # 65 apart but 265 <= 1.5 * 200: both conditions must hold, so balanced
    ],
)
def test_prefix_cache_falls_back_to_the_shortest_queue_only_when_both_imbalance_thresholds_are_passed(
    idle, hot, expected
):
    cluster = view(worker("c-0", kv_block_size=BS, num_running=idle), cached(SYSTEM, worker_id="c-1", num_running=hot))
    decision = PrefixCachePolicy().route(prompt_request(), cluster)
    assert decision.worker_id == expected
    assert decision.reason.endswith("imbalanced" if expected == "c-0" else "hit=1.00")


def test_prefix_cache_breaks_ties_by_load_then_cache_size_then_worker_id():
    policy = PrefixCachePolicy()
    # Equal hits: the less loaded, then the lower id.
    hits = view(cached(SYSTEM, worker_id="c-2"), cached(SYSTEM, worker_id="c-1", num_running=1))
    assert policy.route(prompt_request(), hits).worker_id == "c-2"
    hits = view(cached(SYSTEM, worker_id="c-2"), cached(SYSTEM, worker_id="c-1"))
    assert policy.route(prompt_request(), hits).worker_id == "c-1"
    # Misses at equal load: the one holding fewer blocks, then the lower id.
    misses = view(cached([1, 2, 3, 4, 5, 6, 7, 8], worker_id="c-0"), cached([9, 9, 9, 9], worker_id="c-1"))
    assert policy.route(prompt_request(), misses).worker_id == "c-1"
    misses = view(worker("c-3"), worker("c-2"))
    assert policy.route(prompt_request(), misses).worker_id == "c-2"


def test_prefix_cache_reads_precomputed_hashes_at_the_summary_block_size():
    # The simulator's requests carry their trace's block hashes; its workers summarise at that block size.
    hashes = PromptHashes(block_size=512, hashes=(11, 12, 13, 14))
    req = RouteRequest(request_id="t/r1", deployment="chat", tenant="t", prompt_hashes=hashes)
    cluster = view(
        worker("c-0"),
        worker("c-1", num_running=3, prefix_block_size=512, prefix_block_hashes=frozenset({11, 12, 13, 99})),
        worker("c-2", num_running=1, prefix_block_size=512, prefix_block_hashes=frozenset({12, 13, 14})),
    )
    decision = PrefixCachePolicy().route(req, cluster)
    assert (decision.worker_id, decision.scores["c-2"]) == ("c-1", 1.0)  # c-2 lacks block 0: the chain breaks
    assert decision.reason.endswith("hit=0.75")


def test_prefix_cache_places_decode_by_load_and_prefill_by_cache():
    cluster = view(
        worker("p-0", role="prefill", kv_block_size=BS),
        cached(SYSTEM, role="prefill", worker_id="p-1", num_running=2),
        cached(SYSTEM, role="decode", worker_id="d-0", num_running=1),
        worker("d-1", role="decode", kv_block_size=BS),
    )
    decision = PrefixCachePolicy().route(prompt_request(), cluster)
    assert (decision.prefill_worker_id, decision.worker_id) == ("p-1", "d-1")
    assert decision.reason == "prefix_cache prefill+decode prefill:hit=1.00 decode:load"


@pytest.mark.parametrize(
    ("field", "value"),
    [("cache_threshold", 1.5), ("balance_abs_threshold", -1), ("balance_rel_threshold", 0.5)],
)
def test_prefix_cache_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        PrefixCacheConfig(**{field: value})


# --- shared behaviour ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_policy", ALL_POLICIES)
def test_every_policy_filters_unhealthy_workers(make_policy):
    policy: Policy = make_policy()
    cluster = view(worker("c-0", is_healthy=False), worker("c-1", num_running=3), worker("c-2", is_healthy=False))
    for _ in range(5):
        decision = policy.route(request(), cluster)
        assert decision.worker_id == "c-1"
        assert set(decision.scores) == {"c-1"}


@pytest.mark.parametrize("make_policy", ALL_POLICIES)
def test_every_policy_places_disaggregated_pairs_from_the_right_pools(make_policy):
    policy: Policy = make_policy()
    cluster = view(
        worker("p-0", role="prefill"),
        worker("p-1", role="prefill", is_healthy=False),
        worker("d-0", role="decode"),
        worker("d-1", role="decode", num_running=1),
        worker("other-d", role="decode", deployment="other"),
    )
    for _ in range(4):
        decision = policy.route(request(), cluster)
        assert decision.prefill_worker_id == "p-0"
        assert decision.worker_id in {"d-0", "d-1"}
        assert decision.reason.startswith(f"{policy.name} prefill+decode")


@pytest.mark.parametrize("make_policy", ALL_POLICIES)
def test_every_policy_serves_a_deployment_with_mixed_workers_from_its_mixed_pool(make_policy):
    policy: Policy = make_policy()
    cluster = view(worker("m-0"), worker("p-0", role="prefill"), worker("d-0", role="decode"))
    decision = policy.route(request(), cluster)
    assert (decision.worker_id, decision.prefill_worker_id) == ("m-0", None)


@pytest.mark.parametrize("make_policy", ALL_POLICIES)
@pytest.mark.parametrize(
    ("cluster", "match", "retry_after_s"),
    [
        (view(worker("x-0", deployment="x")), "has no workers yet", 2.0),
        (view(worker("c-0", is_healthy=False)), "no healthy mixed worker", 1.0),
        (view(worker("p-0", role="prefill"), worker("d-0", role="decode", is_healthy=False)), "no healthy decode", 1.0),
        (view(worker("d-0", role="decode")), "no healthy prefill", 1.0),
    ],
)
def test_every_policy_without_candidates_raises_no_capacity(make_policy, cluster, match, retry_after_s):
    with pytest.raises(NoCapacityError, match=match) as info:
        make_policy().route(request(), cluster)
    assert info.value.retry_after_s == retry_after_s


@pytest.mark.parametrize("make_policy", ALL_POLICIES)
def test_every_policy_logs_exactly_one_line_per_decision(make_policy, caplog):
    policy: Policy = make_policy()
    cluster = view(worker("p-0", role="prefill"), worker("d-0", role="decode"), worker("d-1", role="decode"))
    with caplog.at_level(logging.INFO, logger="router.policy"):
        for i in range(3):
            policy.route(request(request_id=f"t/r{i}"), cluster)
    lines = [r.getMessage() for r in caplog.records if r.name == "router.policy"]
    assert len(lines) == 3
    assert all(f"request_id=t/r{i} policy={policy.name}" in line for i, line in enumerate(lines))
    assert all("prefill=p-0" in line for line in lines)

"""Prefix-cache-aware routing: summaries, longest match, the load bound, and the scorer built on them."""

from __future__ import annotations

import pytest

from router.policy import ClusterView, Decision, LoadScorer, RouteRequest, WeightedPolicy, WeightedTerm, WorkerView
from router.prefix_affinity import (
    PrefixAffinityConfig,
    PrefixAffinityScorer,
    PrefixSummary,
    bounded_miss,
    cacheable_prefix_hashes,
    longest_prefix_match,
)
from workers.engine.block_manager import KVCacheManager, prefix_block_hashes
from workers.engine.request import Request
from workers.engine.sampling_params import SamplingParams

BS = 4
SYSTEM = list(range(1000, 1032))  # a 32-token shared system prompt: 8 blocks
PROMPT = [*SYSTEM, 7, 8, 9]


def request(rid: str = "t/r1", adapter: str | None = None) -> RouteRequest:
    return RouteRequest(request_id=rid, deployment="chat", tenant="t", adapter=adapter)


def worker(worker_id: str, role: str = "mixed", **load) -> WorkerView:
    return WorkerView(worker_id=worker_id, deployment="chat", role=role, **load)


def summary_of(tokens: list[int], adapter: str | None = None) -> PrefixSummary:
    return PrefixSummary(block_size=BS, hashes=frozenset(prefix_block_hashes(tokens, BS, adapter)))


class AffinityPolicy:
    """Load plus 4 x the scorer on prefill and mixed pools, least loaded on decode: how `raylane` weighs the term."""

    name = "affinity"

    def __init__(self, summaries: dict[str, PrefixSummary], **config) -> None:
        self.view = ClusterView()
        scorer = PrefixAffinityScorer(
            PrefixAffinityConfig(**config),
            summaries=summaries.get,
            prompt_tokens=lambda r: PROMPT,
            pool=lambda req, w: self.view.candidates(w.deployment, w.role),
        )
        prompt_roles = frozenset({"prefill", "mixed"})
        terms = [WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=scorer, weight=4.0, roles=prompt_roles)]
        self.weighted = WeightedPolicy(terms, name=self.name)

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        self.view = view
        return self.weighted.route(request, view)


def test_longest_match_stops_at_the_first_missing_block():
    hashes = [11, 12, 13, 14]
    assert longest_prefix_match(hashes, {11, 12, 13, 14, 99}) == 4
    assert longest_prefix_match(hashes, {11, 12, 14}) == 2
    assert longest_prefix_match(hashes, {12, 13, 14}) == 0
    assert longest_prefix_match([], {1}) == 0


def test_longest_match_over_real_chained_hashes():
    cached = summary_of(SYSTEM[:16]).hashes  # the first 4 blocks of the system prompt
    assert longest_prefix_match(cacheable_prefix_hashes(PROMPT, BS, None, PrefixAffinityConfig()), cached) == 4
    # The same tokens under an adapter, or after a different first block, match nothing.
    assert longest_prefix_match(prefix_block_hashes(SYSTEM, BS, "sql"), cached) == 0
    assert longest_prefix_match(prefix_block_hashes([0, *SYSTEM[1:]], BS), cached) == 0


def test_cacheable_blocks_leave_the_last_token_to_compute():
    config = PrefixAffinityConfig(max_request_blocks=3)
    assert len(cacheable_prefix_hashes(list(range(8)), BS, None, PrefixAffinityConfig())) == 1  # as the engine: 7 // 4
    assert len(cacheable_prefix_hashes(list(range(100)), BS, None, config)) == 3
    assert cacheable_prefix_hashes([], BS, None, config) == []


def test_bounded_miss():
    config = PrefixAffinityConfig(max_load_gap=2.0, min_match_blocks=2)
    assert bounded_miss(6, 8, load=3.0, min_load=1.0, config=config) == pytest.approx(0.25)
    assert bounded_miss(6, 8, load=3.5, min_load=1.0, config=config) == 1.0  # past the gap
    assert bounded_miss(1, 8, load=1.0, min_load=1.0, config=config) == 1.0  # too short to count
    assert bounded_miss(0, 0, load=9.0, min_load=0.0, config=config) == 0.0


def test_worker_holding_the_prefix_wins_under_equal_load():
    summaries = {"w0": summary_of([1, 2, 3, 4]), "w1": summary_of(SYSTEM), "w2": summary_of(SYSTEM[:8])}
    cluster = ClusterView(workers={"chat": [worker(f"w{i}", num_running=2) for i in range(3)]})
    decision = AffinityPolicy(summaries).route(request(), cluster)
    assert decision.worker_id == "w1"
    assert decision.scores["w1"] < decision.scores["w2"] < decision.scores["w0"]


def test_load_bound_kicks_in_under_skew():
    summaries = {"w0": summary_of([1, 2, 3, 4]), "w1": summary_of(SYSTEM)}
    # A small lead in load is worth paying for the cache hit ...
    near = ClusterView(workers={"chat": [worker("w0", num_running=1), worker("w1", num_running=3)]})
    assert AffinityPolicy(summaries, max_load_gap=2.0).route(request(), near).worker_id == "w1"
    # ... but past the gap the hot worker's cache earns nothing, even with a large affinity weight.
    far = ClusterView(workers={"chat": [worker("w0", num_running=1), worker("w1", num_running=4)]})
    assert AffinityPolicy(summaries, max_load_gap=2.0).route(request(), far).worker_id == "w0"


def test_hot_prefix_spreads_once_its_worker_fills_up():
    summaries = {f"w{i}": summary_of(SYSTEM if i == 0 else [i] * 4) for i in range(3)}
    loads = {"w0": 0, "w1": 0, "w2": 0}
    chooser = AffinityPolicy(summaries, max_load_gap=2.0)
    for n in range(30):
        cluster = ClusterView(workers={"chat": [worker(w, num_running=k) for w, k in loads.items()]})
        loads[chooser.route(request(f"t/r{n}"), cluster).worker_id] += 1
    assert max(loads.values()) - min(loads.values()) <= 3  # the bound plus one
    assert loads["w0"] == max(loads.values())


def test_disaggregated_prefix_picks_prefill_worker_and_least_loaded_decode():
    summaries = {"p1": summary_of(SYSTEM)}
    cluster = ClusterView(
        workers={
            "chat": [
                worker("p0", "prefill"),
                worker("p1", "prefill", num_running=1),
                worker("d0", "decode", num_running=3),
                worker("d1", "decode"),
            ]
        }
    )
    decision = AffinityPolicy(summaries).route(request(), cluster)
    assert (decision.prefill_worker_id, decision.worker_id) == ("p1", "d1")


def test_scorer_in_a_weighted_policy_uses_the_pool_from_the_view():
    summaries = {"w0": summary_of([1, 2, 3, 4]), "w1": summary_of(SYSTEM)}
    state = {"view": ClusterView(workers={"chat": [worker("w0", num_running=1), worker("w1", num_running=2)]})}
    scorer = PrefixAffinityScorer(
        PrefixAffinityConfig(max_load_gap=2.0),
        summaries=summaries.get,
        prompt_tokens=lambda r: PROMPT,
        pool=lambda req, w: state["view"].candidates(w.deployment, w.role),
    )
    weighted = WeightedPolicy([WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=scorer, weight=4.0)])
    assert weighted.route(request(), state["view"]).worker_id == "w1"
    assert scorer.score(request(), worker("w1", num_running=2)) == 0.0
    state["view"] = ClusterView(workers={"chat": [worker("w0"), worker("w1", num_running=5)]})
    assert scorer.score(request(), worker("w1", num_running=5)) == 1.0
    assert weighted.route(request("t/r2"), state["view"]).worker_id == "w0"


def test_worker_without_summary_or_request_without_tokens_is_neutral():
    scorer = PrefixAffinityScorer(summaries={}.get, prompt_tokens=lambda r: PROMPT, pool=None)
    assert scorer.score(request(), worker("w0")) == 1.0  # like a worker holding nothing
    silent = PrefixAffinityScorer(summaries={"w0": summary_of(SYSTEM)}.get, prompt_tokens=lambda r: None, pool=None)
    assert silent.score(request(), worker("w0")) == 0.0


def test_adapter_requests_match_only_blocks_cached_under_that_adapter():
    summaries = {"w0": summary_of(SYSTEM), "w1": summary_of(SYSTEM, adapter="sql")}
    cluster = ClusterView(workers={"chat": [worker("w0"), worker("w1")]})
    assert AffinityPolicy(summaries).route(request(adapter="sql"), cluster).worker_id == "w1"
    assert AffinityPolicy(summaries).route(request(), cluster).worker_id == "w0"


def test_the_engines_published_hashes_match_the_routers_prompt_hashes():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    engine_request = Request(request_id="a", prompt_token_ids=[*SYSTEM, 5], sampling_params=SamplingParams())
    assert kv.allocate(engine_request, engine_request.num_tokens)
    engine_request.num_computed_tokens = engine_request.num_tokens
    kv.cache_computed_blocks(engine_request)
    published = frozenset(kv.cached_block_hashes(4096))
    assert len(published) == 8
    # As the router sees it: the worker's view carries the set, the scorer reads it at the worker's block size.
    cached = worker("w0", kv_block_size=kv.block_size, prefix_block_hashes=published)
    scorer = PrefixAffinityScorer(pool=None)
    assert (
        scorer.score(RouteRequest(request_id="t/r", deployment="chat", tenant="t", prompt_token_ids=PROMPT), cached)
        == 0.0
    )
    hashes = cacheable_prefix_hashes(PROMPT, kv.block_size, None, PrefixAffinityConfig())
    assert longest_prefix_match(hashes, published) == 8


def test_summary_and_config_reject_bad_values():
    with pytest.raises(ValueError, match="block_size"):
        PrefixSummary(block_size=0, hashes=frozenset())
    with pytest.raises(ValueError, match="max_load_gap"):
        PrefixAffinityConfig(max_load_gap=-1)
    with pytest.raises(ValueError, match="min_match_blocks"):
        PrefixAffinityConfig(min_match_blocks=0)

"""The full `raylane` policy against hand-built cluster views: each term steers the pool it belongs to."""

from __future__ import annotations

import logging

import pytest

from router.full_policy import RaylanePolicy, RaylanePolicyConfig
from router.policy import LoadScorer, RouteRequest, WeightedPolicy, WeightedTerm
from router.registry import DEFAULT_POLICY, make_policy
from tests.router.test_policy import view, worker
from workers.engine.block_manager import prefix_block_hashes

BLOCK = 16
PROMPT = tuple(range(100, 100 + 8 * BLOCK + 1))  # eight full cacheable blocks


def request(rid: str = "t/r1", *, prompt_len: int = 100, tokens=None, adapter=None, **extra) -> RouteRequest:
    return RouteRequest(
        request_id=rid,
        deployment="chat",
        tenant="t",
        adapter=adapter,
        num_prompt_tokens_estimate=len(tokens) if tokens else prompt_len,
        prompt_token_ids=tokens,
        **extra,
    )


def decode_worker(wid: str, **load):
    return worker(wid, role="decode", kv_blocks_total=100, kv_block_size=BLOCK, **load)


def test_the_full_policy_is_the_default():
    assert DEFAULT_POLICY == "raylane"
    assert isinstance(make_policy(DEFAULT_POLICY), RaylanePolicy)


def test_decode_goes_where_forecast_kv_is_lowest_not_where_fewest_requests_run():
    # d0 runs one request holding 80% of its KV; d1 runs three short ones holding 10%.
    cluster = view(
        worker("p0", role="prefill"),
        decode_worker("d0", num_running=1, kv_blocks_used=80),
        decode_worker("d1", num_running=3, kv_blocks_used=10),
    )
    decision = RaylanePolicy().route(request(max_tokens=256, predicted_output_p50=200.0), cluster)
    assert decision.worker_id == "d1" and decision.prefill_worker_id == "p0"
    assert make_policy("least_outstanding").route(request(), cluster).worker_id == "d0"


def test_a_cached_prefix_wins_a_prefill_worker_at_equal_load():
    hashes = frozenset(prefix_block_hashes(PROMPT[:-1], BLOCK))
    cluster = view(
        worker("p0", role="prefill", kv_block_size=BLOCK, prefix_block_hashes=frozenset()),
        worker("p1", role="prefill", kv_block_size=BLOCK, prefix_block_hashes=hashes),
        decode_worker("d0"),
    )
    assert RaylanePolicy().route(request(tokens=PROMPT), cluster).prefill_worker_id == "p1"
    # The same prompt under another adapter hashes differently: no hit anywhere, least loaded (ties by id).
    assert RaylanePolicy().route(request(tokens=PROMPT, adapter="a"), cluster).prefill_worker_id == "p0"


def test_load_voids_the_cache_credit_so_a_hot_prefix_cannot_pile_up():
    hashes = frozenset(prefix_block_hashes(PROMPT[:-1], BLOCK))
    cluster = view(
        worker("p0", role="prefill", kv_block_size=BLOCK, prefix_block_hashes=frozenset()),
        worker("p1", role="prefill", kv_block_size=BLOCK, prefix_block_hashes=hashes, num_running=17),
        decode_worker("d0"),
    )
    # Past `max_load_gap` (16 requests above the least loaded) the holder gets no credit.
    assert RaylanePolicy().route(request(tokens=PROMPT), cluster).prefill_worker_id == "p0"


def test_laps_keeps_short_and_long_prompts_on_separate_prefill_workers():
    policy = RaylanePolicy()
    # p1 is the long-class worker (the tail of the id order) and is idle; a short prompt still avoids it.
    cluster = view(
        worker("p0", role="prefill", num_running=2),
        worker("p1", role="prefill"),
        decode_worker("d0"),
    )
    assert policy.route(request("t/s", prompt_len=50), cluster).prefill_worker_id == "p0"
    assert policy.route(request("t/l", prompt_len=4000), cluster).prefill_worker_id == "p1"


def test_laps_partition_is_soft_when_a_class_is_swamped():
    cluster = view(
        worker("p0", role="prefill", num_running=20),
        worker("p1", role="prefill"),
        decode_worker("d0"),
    )
    assert RaylanePolicy().route(request(prompt_len=50), cluster).prefill_worker_id == "p1"


def test_mixed_pools_weigh_adapter_residency_and_prefix():
    hashes = frozenset(prefix_block_hashes(PROMPT[:-1], BLOCK, "a"))
    cluster = view(
        worker("m0", kv_blocks_total=100, kv_block_size=BLOCK),
        worker("m1", kv_blocks_total=100, kv_block_size=BLOCK, adapters=frozenset({"a"})),
        worker("m2", kv_blocks_total=100, kv_block_size=BLOCK, adapters=frozenset({"a"}), prefix_block_hashes=hashes),
    )
    assert RaylanePolicy().route(request(adapter="a"), cluster).worker_id == "m1"
    assert RaylanePolicy().route(request(adapter="a", tokens=PROMPT), cluster).worker_id == "m2"


def test_decisions_replay_identically_and_each_is_one_log_line(caplog):
    cluster = view(
        worker("p0", role="prefill"),
        worker("p1", role="prefill", num_running=1),
        decode_worker("d0", kv_blocks_used=30),
        decode_worker("d1", num_running=2),
    )
    lengths = [30, 900, 64, 2048, 12, 700, 5000, 40] * 10
    runs = []
    for _ in range(2):
        policy = RaylanePolicy()
        runs.append([policy.route(request(f"t/{i}", prompt_len=n), cluster) for i, n in enumerate(lengths)])
    assert runs[0] == runs[1]
    with caplog.at_level(logging.INFO, logger="router.policy"):
        RaylanePolicy().route(request("t/logged"), cluster)
    lines = [r.getMessage() for r in caplog.records if "request_id=t/logged" in r.getMessage()]
    assert len(lines) == 1
    assert "policy=raylane" in lines[0] and "predicted_kv=" in lines[0] and "laps=" in lines[0]


def test_terms_apply_only_to_their_pools_and_config_is_checked():
    with pytest.raises(ValueError, match="subset of prefill, decode, mixed"):
        WeightedTerm(scorer=LoadScorer(), roles=frozenset({"train"}))
    # The same scorer name may appear once per pool.
    WeightedPolicy(
        (
            WeightedTerm(scorer=LoadScorer(), weight=1.0, roles=frozenset({"prefill"})),
            WeightedTerm(scorer=LoadScorer(), weight=0.5, roles=frozenset({"decode"})),
        )
    )
    with pytest.raises(ValueError, match="unique"):
        WeightedPolicy(
            (WeightedTerm(scorer=LoadScorer()), WeightedTerm(scorer=LoadScorer(), roles=frozenset({"mixed"})))
        )
    with pytest.raises(ValueError, match="prefix_weight"):
        RaylanePolicyConfig(prefix_weight=-1.0)


def test_the_router_tokenizes_text_prompts_so_prefix_affinity_sees_them(tiny_llama):
    from router.core import GenerateInput, RouterCore
    from router.quota import QuotaLimits
    from router.table import DeploymentRoute, RoutingTable
    from workers.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(str(tiny_llama))

    class Directory:
        def table(self):
            return RoutingTable(
                deployments={"chat": DeploymentRoute(name="chat")},
                tenants={"t": QuotaLimits(max_concurrent=1, tokens_per_minute=1000)},
            )

        def tokenize(self, deployment, text):
            return tuple(tokenizer.encode(text))

    text = "You are a helpful assistant. " * 8 + "What is a paged KV cache?"
    call, route = RouterCore(Directory()).prepare("t", GenerateInput(deployment="chat", prompt=text))
    assert call.prompt is None and call.prompt_token_ids == tuple(tokenizer.encode(text))
    assert route.prompt_token_ids == call.prompt_token_ids
    assert route.num_prompt_tokens_estimate == len(call.prompt_token_ids)


def test_adapter_affinity_prefers_resident_then_the_cheapest_load():
    from router.policy import adapter_load_cost

    def w(wid, registered=("a", "b"), resident=(), slots=2):
        return worker(
            wid,
            kv_blocks_total=100,
            adapters=frozenset(registered),
            resident_adapters=frozenset(resident),
            num_adapter_slots=slots,
        )

    resident, free_slot, full, missing = (
        w("m3", resident=("a",)),
        w("m2"),
        w("m1", resident=("b", "c"), slots=2),
        w("m0", registered=("b",)),
    )
    assert [adapter_load_cost("a", x) for x in (resident, free_slot, full, missing)] == [0.0, 0.5, 0.75, 1.0]
    assert adapter_load_cost(None, missing) == 0.0
    assert adapter_load_cost("a", worker("old", adapters=frozenset({"a"}))) == 0.0  # no residency report
    assert RaylanePolicy().route(request(adapter="a"), view(missing, full, free_slot, resident)).worker_id == "m3"
    assert RaylanePolicy().route(request(adapter="a"), view(missing, full, free_slot)).worker_id == "m2"
    assert RaylanePolicy().route(request(adapter="a"), view(missing, full)).worker_id == "m1"


def test_prefill_goes_where_the_least_prompt_work_is_queued_not_the_fewest_requests():
    cluster = view(
        worker("p0", role="prefill", num_pending_prefill_tokens=6000),
        worker("p1", role="prefill", num_running=1, num_pending_prefill_tokens=40),
        worker("p2", role="prefill", num_pending_prefill_tokens=3000),
        worker("p3", role="prefill"),
        decode_worker("d0"),
    )
    # p0-p2 serve the short class (p3 the long one); p1's single short prompt is the least work ahead.
    assert RaylanePolicy().route(request(prompt_len=50), cluster).prefill_worker_id == "p1"
    assert make_policy("least_outstanding").route(request(prompt_len=50), cluster).prefill_worker_id in (
        "p0",
        "p2",
        "p3",
    )


def test_each_decision_names_the_term_that_separated_the_winner_from_the_runner_up():
    hashes = frozenset(prefix_block_hashes(PROMPT[:-1], BLOCK))
    cluster = view(
        worker("p0", role="prefill", kv_block_size=BLOCK, prefix_block_hashes=frozenset()),
        worker("p1", role="prefill", kv_block_size=BLOCK, prefix_block_hashes=hashes),
        decode_worker("d0"),
    )
    decision = RaylanePolicy().route(request(tokens=PROMPT), cluster)
    assert decision.deciding_terms == {"prefill": "prefix", "decode": "only_candidate"}
    mixed = view(
        worker("m0", kv_blocks_total=100, kv_block_size=BLOCK),
        worker("m1", kv_blocks_total=100, kv_block_size=BLOCK, adapters=frozenset({"a"})),
    )
    assert RaylanePolicy().route(request(adapter="a"), mixed).deciding_terms == {"mixed": "adapter"}
    twins = view(worker("m0"), worker("m1"))
    assert RaylanePolicy().route(request(), twins).deciding_terms == {"mixed": "tie"}
    # Policies without terms leave it empty; the metric labels them `none`.
    assert make_policy("least_outstanding").route(request(), twins).deciding_terms == {}

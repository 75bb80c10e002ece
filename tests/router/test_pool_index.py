"""Per-pool indexes: kept in step one worker at a time, and the policies decide on them as a full scan does."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.baselines import LeastOutstandingPolicy, PowerOfTwoPolicy, RoundRobinPolicy
from router.full_policy import RaylanePolicy
from router.kv_forecast import RequestKv, WorkerKvSnapshot
from router.policy import ClusterView, LeastLoadedPolicy, NoCapacityError, PromptHashes, RouteRequest, WorkerView
from router.pool_index import ClusterIndex, PoolIndex
from tests.router.test_policy import view, worker

PREFIX_BLOCK = 4
CHAINS = ((11, 12, 13, 14), (11, 12, 23, 24), (31, 32, 33, 34), (41, 42))
"""Chained block hashes of a few prompts; the first two share two leading blocks."""


def indexed(cluster: ClusterView) -> ClusterView:
    return dataclasses.replace(cluster, index=ClusterIndex(w for ws in cluster.workers.values() for w in ws))


def test_an_index_answers_candidates_and_roles_as_the_plain_view_does():
    cluster = view(
        worker("chat-0"),
        worker("chat-1", is_healthy=False),
        worker("chat-p-0", role="prefill"),
        worker("moe-0", deployment="moe"),
    )
    fast = indexed(cluster)
    assert {w.worker_id for w in fast.candidates("chat", "mixed")} == {"chat-0"}
    assert fast.roles("chat") == cluster.roles("chat") == {"mixed", "prefill"}
    assert fast.candidates("chat", "decode") == [] and fast.candidates("nope", "mixed") == []


def test_an_update_moves_a_worker_in_every_index_and_health_takes_it_out():
    index = ClusterIndex([worker("w0", num_running=3), worker("w1", num_running=1, adapters=frozenset({"a"}))])
    pool = index.pool("chat", "mixed")
    assert pool is not None and pool.least_loaded().worker_id == "w1"
    index.update(worker("w0", prefix_block_hashes=frozenset({7, 8})))
    assert pool.least_loaded().worker_id == "w0"
    assert pool.prefix_holders[16][7] == {"w0"} and pool.registered["a"] == pool.resident["a"] == {"w1"}
    index.update(
        worker("w1", num_running=1, adapters=frozenset({"a"}), resident_adapters=frozenset(), is_healthy=False)
    )
    assert pool.ids == ["w0"] and "a" not in pool.registered and index.roles("chat") == {"mixed"}
    index.remove("w0")
    assert len(pool) == 0 and pool.prefix_holders[16] == {}
    assert index.roles("chat") == {"mixed"}  # the unhealthy w1 still names the role, as in a plain view
    index.remove("w1")
    assert index.roles("chat") == set()


def test_an_ordering_is_rebuilt_when_its_version_moves():
    pool = PoolIndex()
    for i, pending in enumerate((30, 10, 20)):
        pool.add(worker(f"w{i}", num_pending_prefill_tokens=pending))
    first = pool.ordering("backlog", lambda w: w.num_pending_prefill_tokens / 10, version=10)
    assert [wid for _, wid in first] == ["w1", "w2", "w0"]
    assert pool.ordering("backlog", lambda w: 0.0, version=10) is first
    assert [key for key, _ in pool.ordering("backlog", lambda w: w.num_pending_prefill_tokens / 5, version=5)] == [
        2.0,
        4.0,
        6.0,
    ]


# --- The property: on random views, every policy decides on the index as on a full scan ------------------------

ledgers = st.lists(
    st.builds(
        RequestKv,
        num_prompt_tokens=st.integers(0, 400),
        num_generated=st.integers(0, 200),
        max_tokens=st.just(256),
        predicted_output_p50=st.one_of(st.none(), st.floats(1, 300)),
        predicted_output_p90=st.one_of(st.none(), st.floats(1, 500)),
    ),
    max_size=4,
)


@st.composite
def workers(draw, role: str, count: int) -> list[WorkerView]:
    out = []
    kv_total = draw(st.sampled_from((0, 64, 256)))  # one size per pool, sometimes unknown
    for i in range(count):
        held = draw(st.sets(st.sampled_from(CHAINS)).map(lambda chains: [h for c in chains for h in c]))
        requests = draw(ledgers)
        out.append(
            WorkerView(
                worker_id=f"{role}-{i:02d}",
                deployment="chat",
                role=role,
                is_healthy=draw(st.booleans()) or i == 0,
                num_running=draw(st.integers(0, 4)),
                num_waiting=draw(st.integers(0, 2)),
                num_inflight=draw(st.integers(0, 2)),
                kv_usage=draw(st.sampled_from((0.0, 0.25, 0.5, 1.0))),
                kv_blocks_total=kv_total,
                kv_blocks_used=draw(st.integers(0, 64)),
                kv_block_size=16,
                num_pending_prefill_tokens=draw(st.sampled_from((0, 100, 1000))),
                adapters=draw(st.frozensets(st.sampled_from("ab"))),
                resident_adapters=draw(st.one_of(st.none(), st.frozensets(st.sampled_from("ab")))),
                num_adapter_slots=draw(st.integers(0, 2)),
                kv_ledger=WorkerKvSnapshot(requests=tuple(requests)) if requests or draw(st.booleans()) else None,
                prefix_block_hashes=draw(st.one_of(st.none(), st.just(frozenset(held)))),
                prefix_block_size=PREFIX_BLOCK,
            )
        )
    return out


@st.composite
def clusters(draw) -> ClusterView:
    if draw(st.booleans()):
        pools = draw(workers("mixed", draw(st.integers(1, 12))))
    else:
        pools = draw(workers("prefill", draw(st.integers(1, 4)))) + draw(workers("decode", draw(st.integers(1, 12))))
    return view(*pools)


@st.composite
def requests(draw) -> list[RouteRequest]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        chain = draw(
            st.one_of(
                st.none(), st.sampled_from(CHAINS).flatmap(lambda c: st.integers(0, len(c)).map(lambda n, c=c: c[:n]))
            )
        )
        out.append(
            RouteRequest(
                request_id=f"t/r{i}",
                deployment="chat",
                tenant="t",
                adapter=draw(st.sampled_from((None, "a", "b"))),
                num_prompt_tokens_estimate=draw(st.integers(0, 600)),
                max_tokens=256,
                predicted_output_p50=draw(st.one_of(st.none(), st.floats(1, 300))),
                predicted_output_p90=draw(st.one_of(st.none(), st.floats(1, 500))),
                prompt_hashes=None if chain is None else PromptHashes(block_size=PREFIX_BLOCK, hashes=chain),
            )
        )
    return out


def raylane() -> RaylanePolicy:
    policy = RaylanePolicy()
    policy.weighted.search.min_pool_size = 0  # search every pool, however small
    return policy


def decide(policy, request: RouteRequest, cluster: ClusterView):
    try:
        d = policy.route(request, cluster)
    except NoCapacityError as e:
        return "no capacity", str(e)
    return d.worker_id, d.prefill_worker_id, dict(d.deciding_terms), {d.worker_id: d.scores.get(d.worker_id)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=clusters(), batch=requests(), seed=st.integers(0, 2**16))
def test_every_policy_decides_on_the_index_as_on_a_full_scan(cluster, batch, seed):
    fast = indexed(cluster)
    pairs = [
        (raylane(), raylane()),
        (LeastLoadedPolicy(), LeastLoadedPolicy()),
        (LeastOutstandingPolicy(), LeastOutstandingPolicy()),
        (PowerOfTwoPolicy(seed=seed), PowerOfTwoPolicy(seed=seed)),
        (RoundRobinPolicy(), RoundRobinPolicy()),
    ]
    for full, narrow in pairs:
        for request in batch:  # a sequence, so the LAPS splitter and the p2c stream advance alike
            assert decide(narrow, request, fast) == decide(full, request, cluster), (full.name, request)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=clusters(), after=clusters(), batch=requests(), order=st.randoms(use_true_random=False))
def test_an_index_updated_worker_by_worker_decides_as_one_built_from_scratch(before, after, batch, order):
    index = ClusterIndex(w for ws in before.workers.values() for w in ws)
    changed = [w for ws in after.workers.values() for w in ws]
    order.shuffle(changed)
    gone = {w.worker_id for ws in before.workers.values() for w in ws} - {w.worker_id for w in changed}
    for w in changed:
        index.update(w)
    for wid in gone:
        index.remove(wid)
    updated = dataclasses.replace(after, index=index)
    for request in batch:
        assert decide(raylane(), request, updated) == decide(raylane(), request, after)
        assert decide(LeastOutstandingPolicy(), request, updated) == decide(LeastOutstandingPolicy(), request, after)


def test_a_big_pool_scores_a_few_workers_not_all():
    rng = random.Random(0)
    pool = [
        worker(f"w{i:04d}", kv_blocks_total=1000, kv_blocks_used=rng.randrange(1000), num_running=rng.randrange(8))
        for i in range(1000)
    ]
    cluster = view(*pool)
    request = RouteRequest(request_id="t/r", deployment="chat", tenant="t", num_prompt_tokens_estimate=500)
    full, narrow = RaylanePolicy(), RaylanePolicy()
    slow_decision, fast_decision = full.route(request, cluster), narrow.route(request, indexed(cluster))
    assert fast_decision.worker_id == slow_decision.worker_id
    assert fast_decision.deciding_terms == slow_decision.deciding_terms
    assert len(slow_decision.scores) == 1000 and len(fast_decision.scores) < 50

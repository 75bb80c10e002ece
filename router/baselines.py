"""Baseline routing policies, kept in-tree so smarter policies are always measured against them in the same run.

Each implements `router.policy.Policy` and places through `place_by_role`, so mixed and disaggregated
deployments are handled exactly as `LeastLoadedPolicy` handles them. Round-robin and power-of-two keep
state (a cursor, a random stream); both are deterministic given the same sequence of calls and seed.
`PrefixCachePolicy` is pure.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from router.policy import ClusterView, Decision, RouteRequest, WorkerView, log_decision, place_and_log, place_by_role
from router.prefix_affinity import PrefixAffinityConfig, longest_prefix_match, prompt_block_hashes


def num_outstanding(worker: WorkerView) -> int:
    """Requests the worker holds or will hold: running, queued, and sent by this router but not yet reported."""
    return worker.num_running + worker.num_waiting + worker.num_inflight


class RoundRobinPolicy:
    """Cycles through each (deployment, role) pool in worker-id order, ignoring load.

    The cursor remembers the last worker id, not an index, so a worker joining or turning unhealthy does
    not make the cycle skip or repeat the others.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], str] = {}

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        return place_and_log(request, view, lambda req, cands, role: self._pick(req, cands, role, view), self.name)

    def _pick(
        self, request: RouteRequest, candidates: Sequence[WorkerView], role: str, view: ClusterView | None = None
    ) -> tuple[WorkerView, dict[str, float]]:
        last = self._last.get((request.deployment, role))
        pool = view.index.pool(request.deployment, role) if view is not None and view.index is not None else None
        if pool is not None and len(pool):
            # The index's sorted ids: the next id after the cursor by bisection; only the chosen one is scored.
            start = bisect.bisect_right(pool.ids, last) if last is not None else 0
            chosen = pool.views[pool.ids[start % len(pool.ids)]]
            self._last[(request.deployment, role)] = chosen.worker_id
            return chosen, {chosen.worker_id: 0.0}
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        start = next((i for i, w in enumerate(ordered) if last is None or w.worker_id > last), 0)
        chosen = ordered[start]
        self._last[(request.deployment, role)] = chosen.worker_id
        # Score = how many turns until each worker's go; the chosen one is 0.
        scores = {w.worker_id: float((i - start) % len(ordered)) for i, w in enumerate(ordered)}
        return chosen, scores


class LeastOutstandingPolicy:
    """Fewest outstanding requests (running + waiting + inflight); ties go to the lowest worker id.

    Unlike `LeastLoadedPolicy` it ignores KV usage and adapter residency: the classic JSQ baseline.
    """

    name = "least_outstanding"

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        return place_and_log(
            request, view, lambda req, candidates, role: _pick_least_outstanding(req, candidates, role, view), self.name
        )


def _pick_least_outstanding(
    request: RouteRequest, candidates: Sequence[WorkerView], role: str, view: ClusterView | None = None
) -> tuple[WorkerView, dict[str, float]]:
    pool = view.index.pool(request.deployment, role) if view is not None and view.index is not None else None
    if pool is not None and len(pool):
        # The pool index keeps workers by (outstanding, worker id): its first entry is the scan's minimum.
        outstanding, worker_id = pool.ordering("outstanding", num_outstanding).first()
        return pool.views[worker_id], {worker_id: float(outstanding)}
    scores = {w.worker_id: float(num_outstanding(w)) for w in candidates}
    return min(candidates, key=lambda w: (scores[w.worker_id], w.worker_id)), scores


class PowerOfTwoPolicy:
    """Power of two choices: sample two distinct candidates, send to the one with fewer outstanding requests.

    Candidates are sorted by worker id before sampling, so the choice depends on the seed and the pool,
    not on the order the view lists workers in. Only the two sampled workers appear in the decision's scores.
    """

    name = "power_of_two"

    def __init__(self, *, rng: random.Random | None = None, seed: int = 0) -> None:
        self.rng = rng if rng is not None else random.Random(seed)

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        return place_and_log(request, view, lambda req, cands, role: self._pick(req, cands, role, view), self.name)

    def _pick(
        self, request: RouteRequest, candidates: Sequence[WorkerView], role: str, view: ClusterView | None = None
    ) -> tuple[WorkerView, dict[str, float]]:
        pool = view.index.pool(request.deployment, role) if view is not None and view.index is not None else None
        if pool is not None and len(pool):
            # The index's sorted ids stand in for the sorted pool: same length, same positions, same draw.
            ids = pool.ids
            sampled = [pool.views[wid] for wid in (self.rng.sample(ids, 2) if len(ids) >= 2 else ids)]
        else:
            ordered = sorted(candidates, key=lambda w: w.worker_id)
            sampled = self.rng.sample(ordered, 2) if len(ordered) >= 2 else ordered
        scores = {w.worker_id: float(num_outstanding(w)) for w in sampled}
        return min(sampled, key=lambda w: (scores[w.worker_id], w.worker_id)), scores


@dataclass(kw_only=True, frozen=True)
class PrefixCacheConfig:
    """The thresholds of SGLang's `cache_aware` router policy; the defaults are sgl-router's."""

    cache_threshold: float = 0.3
    """Go to the longest-match worker only when its match covers more than this share of the prompt's cacheable
    blocks, in [0, 1]; otherwise the least loaded worker."""
    balance_abs_threshold: float = 64.0
    """A pool is imbalanced when its most and least loaded workers differ by more than this many outstanding
    requests (and `balance_rel_threshold` holds too); >= 0."""
    balance_rel_threshold: float = 1.5
    """... and the most loaded has more than this times the least's outstanding requests; >= 1."""
    hashing: PrefixAffinityConfig = dataclasses.field(default_factory=PrefixAffinityConfig)
    """How prompts are hashed into blocks (only `max_request_blocks` matters here), as `raylane` hashes them."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if not (math.isfinite(self.balance_abs_threshold) and self.balance_abs_threshold >= 0):
            raise ValueError(f"balance_abs_threshold must be finite and >= 0, got {self.balance_abs_threshold}")
        if not (math.isfinite(self.balance_rel_threshold) and self.balance_rel_threshold >= 1):
            raise ValueError(f"balance_rel_threshold must be finite and >= 1, got {self.balance_rel_threshold}")


class PrefixCachePolicy:
    """The longest cached prefix, and nothing else, as SGLang's router (`--policy cache_aware`) places requests.

    Per prefill or mixed pool, with load = outstanding requests (`num_outstanding`):
    1. imbalanced (max - min > `balance_abs_threshold` and max > `balance_rel_threshold` * min): least loaded;
    2. else the worker whose cache holds the longest leading run of the prompt's blocks (ties: less loaded, then
       fewer cached blocks, then worker id), if that run is more than `cache_threshold` of the prompt's blocks;
    3. else the least loaded (ties: fewer cached blocks, then worker id).
    Decode pools go to the least loaded: the prefill worker hands its KV over, so no cache is reused there.

    SGLang keeps an approximate radix tree of what it routed where; this reads what the workers published
    (`WorkerView.prefix_block_hashes`), like SGLang's KV-event mode and like `raylane`, so both see the same
    cache state. Where SGLang's tree falls back to the smallest tree, a published summary is capped at
    `WorkerConfig.prefix_summary_limit` hashes (busy workers all tie at the cap), so load decides first. Pure: no
    state between calls.
    """

    name = "prefix_cache"

    def __init__(self, config: PrefixCacheConfig | None = None) -> None:
        self.config = config or PrefixCacheConfig()

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        modes: list[str] = []
        hashes_by_block_size: dict[int, list[int]] = {}

        def pick(req: RouteRequest, candidates: Sequence[WorkerView], role: str) -> tuple[WorkerView, dict[str, float]]:
            worker, scores, mode = self._pick(req, candidates, role, hashes_by_block_size)
            modes.append(f"{role}:{mode}")
            return worker, scores

        decision = place_by_role(request, view, pick, policy=self.name)
        decision = dataclasses.replace(decision, reason=f"{decision.reason} {' '.join(modes)}")
        log_decision(self.name, request, decision)
        return decision

    def _pick(
        self,
        request: RouteRequest,
        candidates: Sequence[WorkerView],
        role: str,
        hashes_by_block_size: dict[int, list[int]],
    ) -> tuple[WorkerView, dict[str, float], str]:
        loads = {w.worker_id: float(num_outstanding(w)) for w in candidates}
        if role == "decode":
            return _least(candidates, loads), loads, "load"
        most, least = max(loads.values()), min(loads.values())
        c = self.config
        if most - least > c.balance_abs_threshold and most > c.balance_rel_threshold * least:
            return _least(candidates, loads), loads, "imbalanced"
        # Share of each worker's cacheable prompt blocks it holds; hashed once per block size per request.
        shares: dict[str, float] = {}
        for w in candidates:
            block_size = w.prefix_block_size or w.kv_block_size
            hashes = hashes_by_block_size.get(block_size)
            if hashes is None:
                hashes = hashes_by_block_size[block_size] = prompt_block_hashes(request, block_size, c.hashing)
            cached = w.prefix_block_hashes
            matched = longest_prefix_match(hashes, cached) if hashes and cached else 0
            shares[w.worker_id] = matched / len(hashes) if hashes else 0.0
        best = min(candidates, key=lambda w: (-shares[w.worker_id], loads[w.worker_id], _num_cached(w), w.worker_id))
        if shares[best.worker_id] > c.cache_threshold:
            # Scores: the share of the prompt each worker would still have to prefill (lower is better).
            return best, {wid: 1.0 - share for wid, share in shares.items()}, f"hit={shares[best.worker_id]:.2f}"
        return _least(candidates, loads), loads, f"miss={shares[best.worker_id]:.2f}"


def _num_cached(worker: WorkerView) -> int:
    return len(worker.prefix_block_hashes) if worker.prefix_block_hashes is not None else 0


def _least(candidates: Sequence[WorkerView], loads: dict[str, float]) -> WorkerView:
    return min(candidates, key=lambda w: (loads[w.worker_id], _num_cached(w), w.worker_id))

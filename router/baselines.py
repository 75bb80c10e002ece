"""Baseline routing policies, kept in-tree so smarter policies are always measured against them in the same run.

Each implements `router.policy.Policy` and places through `place_by_role`, so mixed and disaggregated
deployments are handled exactly as `LeastLoadedPolicy` handles them. Round-robin and power-of-two keep
state (a cursor, a random stream); both are deterministic given the same sequence of calls and seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.policy import ClusterView, Decision, RouteRequest, WorkerView, place_and_log


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
        return place_and_log(request, view, self._pick, self.name)

    def _pick(
        self, request: RouteRequest, candidates: Sequence[WorkerView], role: str
    ) -> tuple[WorkerView, dict[str, float]]:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        last = self._last.get((request.deployment, role))
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
        return place_and_log(request, view, _pick_least_outstanding, self.name)


def _pick_least_outstanding(
    request: RouteRequest, candidates: Sequence[WorkerView], role: str
) -> tuple[WorkerView, dict[str, float]]:
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
        return place_and_log(request, view, self._pick, self.name)

    def _pick(
        self, request: RouteRequest, candidates: Sequence[WorkerView], role: str
    ) -> tuple[WorkerView, dict[str, float]]:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        sampled = self.rng.sample(ordered, 2) if len(ordered) >= 2 else ordered
        scores = {w.worker_id: float(num_outstanding(w)) for w in sampled}
        return min(sampled, key=lambda w: (scores[w.worker_id], w.worker_id)), scores

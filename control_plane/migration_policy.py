"""Which running requests to migrate live, and where: pure functions over worker snapshots (no Ray, no I/O).

Two reasons to move a request (README, "Live migration and failover"):

- `plan_rebalance`: even out the predicted remaining KV demand (blocks held now plus blocks the request
  will still grow into) between the most and the least loaded workers;
- `plan_drain`: move every running request off a worker that is about to stop.

Every plan honours a per-worker rate limit (`MigrationHistory`): at most `max_in_flight_per_worker`
migrations touching a worker at once, and `min_interval_s` between two that start on the same worker.
The simulator and the control plane's rebalancer call the same functions. Each decision is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from router.kv_forecast import predicted_remaining_tokens
from workers.messages import RunningRequestInfo

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class MigrationPolicyConfig:
    """Knobs of the migration policy."""

    min_imbalance: float = 0.2
    """Rebalance only when the most and least loaded workers' demand (as a fraction of their pool) differ by
    at least this much."""
    headroom_blocks: int = 4
    """Blocks a destination must still have free after taking a request's current blocks."""
    max_in_flight_per_worker: int = 1
    """Migrations at once in which a worker is source or destination."""
    min_interval_s: float = 5.0
    """Seconds between the starts of two migrations on the same worker (as source or destination)."""
    max_per_round: int = 4
    """Rebalancing migrations one `plan_rebalance` call may return."""

    def __post_init__(self) -> None:
        if not 0 < self.min_imbalance <= 1:
            raise ValueError(f"min_imbalance must be in (0, 1], got {self.min_imbalance}")
        if self.headroom_blocks < 0 or self.max_in_flight_per_worker < 1 or self.max_per_round < 1:
            raise ValueError(
                "need headroom_blocks >= 0, max_in_flight_per_worker >= 1 and max_per_round >= 1, got "
                f"{self.headroom_blocks}, {self.max_in_flight_per_worker}, {self.max_per_round}"
            )
        if self.min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {self.min_interval_s}")


@dataclass(kw_only=True, frozen=True)
class WorkerView:
    """What the policy knows about one worker."""

    worker_id: str
    """The worker."""
    kv_blocks_total: int
    """Size of its KV pool."""
    kv_blocks_used: int
    """Blocks held by requests (or reserved for incoming migrations)."""
    block_size: int
    """Tokens per block."""
    requests: tuple[RunningRequestInfo, ...] = ()
    """Its running requests (`LLMWorker.running_requests`)."""
    accepting: bool = True
    """False for a worker that must not receive migrations (draining, wrong role, unhealthy)."""

    def __post_init__(self) -> None:
        if self.kv_blocks_total <= 0 or self.block_size <= 0:
            raise ValueError(f"worker {self.worker_id!r}: kv_blocks_total and block_size must be positive")
        object.__setattr__(self, "requests", tuple(self.requests))

    @property
    def free_blocks(self) -> int:
        return max(self.kv_blocks_total - self.kv_blocks_used, 0)


@dataclass(kw_only=True, frozen=True)
class MigrationHistory:
    """Rate-limit state the caller keeps between plans."""

    in_flight: Mapping[str, int] = field(default_factory=dict)
    """Worker id -> migrations now running that touch it."""
    last_started: Mapping[str, float] = field(default_factory=dict)
    """Worker id -> when (caller's clock, seconds) the last migration touching it started."""


@dataclass(kw_only=True, frozen=True)
class MigrationDecision:
    """Move `request_id` from `source_id` to `destination_id`."""

    request_id: str
    source_id: str
    destination_id: str
    reason: str
    """`rebalance` or `drain`."""
    num_blocks: int
    """Blocks the request holds now (what the pre-copy moves)."""


def remaining_tokens(request: RunningRequestInfo, predicted: Mapping[str, int] | None = None) -> int:
    """Tokens the request will still generate: the caller's prediction if any (from
    `router.kv_forecast.predicted_remaining_tokens`), else that estimator without a prediction (its cap)."""
    if predicted is not None and request.request_id in predicted:
        return max(int(predicted[request.request_id]), 0)
    return predicted_remaining_tokens(
        num_generated=request.num_output_tokens, max_tokens=request.max_tokens, p50=None, p90=None, use_p90=False
    )


def request_demand_blocks(
    request: RunningRequestInfo, block_size: int, predicted: Mapping[str, int] | None = None
) -> int:
    """Blocks the request holds plus those it will grow into before it finishes."""
    total_tokens = request.num_prompt_tokens + request.num_output_tokens + remaining_tokens(request, predicted)
    return max(-(-total_tokens // block_size), request.num_blocks)


def demand_fraction(worker: WorkerView, predicted: Mapping[str, int] | None = None) -> float:
    """Predicted peak KV demand of the worker's running requests over its pool size."""
    demand = sum(request_demand_blocks(r, worker.block_size, predicted) for r in worker.requests)
    return demand / worker.kv_blocks_total


def is_rate_allowed(worker_id: str, history: MigrationHistory, now: float, config: MigrationPolicyConfig) -> bool:
    """Whether a new migration may touch `worker_id` now."""
    if history.in_flight.get(worker_id, 0) >= config.max_in_flight_per_worker:
        return False
    last = history.last_started.get(worker_id)
    return last is None or now - last >= config.min_interval_s


def plan_rebalance(
    workers: Sequence[WorkerView],
    *,
    history: MigrationHistory,
    now: float,
    config: MigrationPolicyConfig,
    predicted: Mapping[str, int] | None = None,
) -> list[MigrationDecision]:
    """Pairs (most loaded -> least loaded) whose move best narrows the demand gap, one migration per worker."""
    _check_unique(workers)
    demand = {w.worker_id: demand_fraction(w, predicted) for w in workers}
    used = {w.worker_id: w.kv_blocks_used for w in workers}
    busy: set[str] = set()
    decisions: list[MigrationDecision] = []
    while len(decisions) < config.max_per_round:
        ready = [w for w in workers if w.worker_id not in busy and is_rate_allowed(w.worker_id, history, now, config)]
        sources = [w for w in ready if w.requests]
        targets = [w for w in ready if w.accepting]
        if not sources or not targets:
            break
        source = max(sources, key=lambda w: (demand[w.worker_id], w.worker_id))
        target = min(targets, key=lambda w: (demand[w.worker_id], w.worker_id))
        gap = demand[source.worker_id] - demand[target.worker_id]
        if source is target or gap < config.min_imbalance:
            break
        best = _best_request_to_even(source, target, demand, used, config, predicted)
        if best is None:
            busy.add(source.worker_id)  # nothing of its fits the emptiest worker: try the next source
            continue
        request, moved = best
        demand[source.worker_id] -= moved / source.kv_blocks_total
        demand[target.worker_id] += moved / target.kv_blocks_total
        used[target.worker_id] += request.num_blocks
        busy.update((source.worker_id, target.worker_id))
        decisions.append(_decide(request, source, target, "rebalance", gap=gap))
    return decisions


def plan_drain(
    worker_id: str,
    workers: Sequence[WorkerView],
    *,
    config: MigrationPolicyConfig,
) -> list[MigrationDecision]:
    """A destination for every running request of `worker_id`, biggest first, to the accepting worker with the
    most free blocks; requests that fit nowhere are left out (retry once others finish). Drains are explicit,
    so the rate limit is left to the caller, which runs the moves one at a time."""
    _check_unique(workers)
    by_id = {w.worker_id: w for w in workers}
    if worker_id not in by_id:
        raise ValueError(f"unknown worker {worker_id!r}; known: {sorted(by_id)}")
    source = by_id[worker_id]
    free = {w.worker_id: w.free_blocks for w in workers if w.accepting and w.worker_id != worker_id}
    decisions = []
    for request in sorted(source.requests, key=lambda r: (-r.num_blocks, r.request_id)):
        fits = [wid for wid, n in free.items() if n - request.num_blocks >= config.headroom_blocks]
        if not fits:
            logger.info(
                "migration decision skipped reason=drain request_id=%s source=%s blocks=%d: no worker has room",
                request.request_id,
                worker_id,
                request.num_blocks,
            )
            continue
        target_id = max(fits, key=lambda wid: (free[wid], wid))
        free[target_id] -= request.num_blocks
        decisions.append(_decide(request, source, by_id[target_id], "drain"))
    return decisions


def _best_request_to_even(
    source: WorkerView,
    target: WorkerView,
    demand: dict[str, float],
    used: dict[str, int],
    config: MigrationPolicyConfig,
    predicted: Mapping[str, int] | None,
) -> tuple[RunningRequestInfo, int] | None:
    """The request whose move leaves the lower max(source, target) demand, cheapest copy on ties."""
    room = target.kv_blocks_total - used[target.worker_id] - config.headroom_blocks
    best = None
    best_key = None
    current = demand[source.worker_id]
    for request in source.requests:
        if request.num_blocks > room:
            continue
        moved = request_demand_blocks(request, source.block_size, predicted)
        after_source = demand[source.worker_id] - moved / source.kv_blocks_total
        after_target = demand[target.worker_id] + moved / target.kv_blocks_total
        peak = max(after_source, after_target)
        if peak >= current:
            continue  # would only move the hot spot
        key = (peak, request.num_blocks, request.request_id)
        if best_key is None or key < best_key:
            best, best_key = (request, moved), key
    return best


def _decide(
    request: RunningRequestInfo, source: WorkerView, target: WorkerView, reason: str, gap: float | None = None
) -> MigrationDecision:
    logger.info(
        "migration decision reason=%s request_id=%s source=%s destination=%s blocks=%d priority=%d gap=%s",
        reason,
        request.request_id,
        source.worker_id,
        target.worker_id,
        request.num_blocks,
        request.priority,
        "-" if gap is None else f"{gap:.3f}",
    )
    return MigrationDecision(
        request_id=request.request_id,
        source_id=source.worker_id,
        destination_id=target.worker_id,
        reason=reason,
        num_blocks=request.num_blocks,
    )


def _check_unique(workers: Sequence[WorkerView]) -> None:
    ids = [w.worker_id for w in workers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"worker ids must be unique, got {ids}")

"""Routing policies: filter the candidate workers, score them, pick one. Pure functions of a `ClusterView`.

The same objects run in the router, in the simulator and in tests. Each decision is logged as one
structured line. The routing-intelligence work (length- and complexity-aware policies) plugs in
behind `Policy`; `LeastLoadedPolicy` is the default until then.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class WorkerView:
    """What a policy may know about one worker: its identity and its last reported load."""

    worker_id: str
    """Unique id, e.g. `chat-decode-0`."""
    deployment: str
    """Deployment the worker serves."""
    role: str
    """`prefill`, `decode` or `mixed`."""
    is_healthy: bool = True
    """False once the control plane marked it dead or its stats went stale."""
    num_running: int = 0
    """Requests in its running batch."""
    num_waiting: int = 0
    """Requests queued on it."""
    kv_usage: float = 0.0
    """Fraction of its KV blocks in use, in [0, 1]."""
    kv_blocks_total: int = 0
    """Size of its KV pool in blocks."""
    adapters: frozenset[str] = frozenset()
    """LoRA adapters resident on it."""
    num_inflight: int = 0
    """Requests this router sent it that have not finished (fresher than its stats)."""


@dataclass(kw_only=True, frozen=True)
class ClusterView:
    """A snapshot of the workers a router can reach, grouped by deployment."""

    workers: Mapping[str, Sequence[WorkerView]] = field(default_factory=dict)
    """Deployment name -> its workers, every role."""

    def candidates(self, deployment: str, role: str) -> list[WorkerView]:
        """Healthy workers of `deployment` in `role`."""
        return [w for w in self.workers.get(deployment, ()) if w.role == role and w.is_healthy]

    def roles(self, deployment: str) -> set[str]:
        return {w.role for w in self.workers.get(deployment, ())}


@dataclass(kw_only=True, frozen=True)
class RouteRequest:
    """What a policy knows about a request when placing it."""

    request_id: str
    deployment: str
    tenant: str
    adapter: str | None = None
    num_prompt_tokens_estimate: int = 0
    """Prompt length in tokens, or an estimate from the text."""
    max_tokens: int = 16


@dataclass(kw_only=True, frozen=True)
class Decision:
    """Where a request runs: a decode (or mixed) worker, plus a prefill worker when disaggregated."""

    worker_id: str
    """The worker that streams the output tokens (decode or mixed role)."""
    prefill_worker_id: str | None = None
    """The worker that runs the prompt and hands its KV to `worker_id`; None for mixed pools."""
    reason: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)
    """Score of every candidate considered (lower is better)."""


class NoCapacityError(RuntimeError):
    """No healthy worker can take the request right now; the caller should retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Policy(Protocol):
    """Places one request. Implementations are pure: the same view and request give the same decision."""

    name: str

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        """Pick the workers for `request`; raise `NoCapacityError` when there are none."""
        ...


def load_score(worker: WorkerView) -> float:
    """Lower is less loaded: queued and running requests, then KV pressure as a tie-breaker."""
    return float(worker.num_running + worker.num_waiting + worker.num_inflight) + worker.kv_usage


def pick_least_loaded(candidates: Sequence[WorkerView], request: RouteRequest) -> tuple[WorkerView, dict[str, float]]:
    """The candidate with the lowest score; adapter residency breaks ties so LoRA requests stay warm."""
    if not candidates:
        raise NoCapacityError(f"no healthy worker for deployment {request.deployment!r}")
    scores = {w.worker_id: load_score(w) for w in candidates}

    def key(w: WorkerView) -> tuple[float, int, str]:
        cold = int(request.adapter is not None and request.adapter not in w.adapters)
        return scores[w.worker_id], cold, w.worker_id

    return min(candidates, key=key), scores


class LeastLoadedPolicy:
    """Least-loaded placement on each pool; prefill and decode are chosen independently when disaggregated."""

    name = "least_loaded"

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        roles = view.roles(request.deployment)
        if not roles:
            raise NoCapacityError(f"deployment {request.deployment!r} has no workers yet", retry_after_s=2.0)
        if "mixed" in roles:
            worker, scores = pick_least_loaded(view.candidates(request.deployment, "mixed"), request)
            decision = Decision(worker_id=worker.worker_id, reason="least_loaded mixed", scores=scores)
        else:
            prefill, prefill_scores = pick_least_loaded(view.candidates(request.deployment, "prefill"), request)
            decode, decode_scores = pick_least_loaded(view.candidates(request.deployment, "decode"), request)
            decision = Decision(
                worker_id=decode.worker_id,
                prefill_worker_id=prefill.worker_id,
                reason="least_loaded prefill+decode",
                scores={**prefill_scores, **decode_scores},
            )
        log_decision(self.name, request, decision)
        return decision


def log_decision(policy: str, request: RouteRequest, decision: Decision) -> None:
    scores = ",".join(f"{wid}:{score:.2f}" for wid, score in sorted(decision.scores.items()))
    logger.info(
        "route request_id=%s policy=%s deployment=%s tenant=%s adapter=%s candidates=%s prefill=%s worker=%s reason=%s",
        request.request_id,
        policy,
        request.deployment,
        request.tenant,
        request.adapter or "-",
        scores,
        decision.prefill_worker_id or "-",
        decision.worker_id,
        decision.reason,
    )

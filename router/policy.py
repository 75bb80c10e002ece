"""Routing policies: filter the candidate workers, score them, pick one. Pure functions of a `ClusterView`.

The same objects run in the router, in the simulator and in tests. Each decision is logged as one
structured line. The routing-intelligence work (length- and complexity-aware policies) plugs in
behind `Policy`; `LeastLoadedPolicy` is the default until then.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from router.kv_forecast import EMPTY_SNAPSHOT, WorkerKvSnapshot, predicted_remaining_tokens

if TYPE_CHECKING:
    from router.pool_index import ClusterIndex

logger = logging.getLogger(__name__)


DEFAULT_KV_BLOCK_SIZE = 16
"""The engine's default tokens per KV block (`EngineConfig.block_size`)."""


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
    """LoRA adapters registered on it (loadable there without fetching weights)."""
    num_pending_prefill_tokens: int = 0
    """Prompt tokens queued or mid-prefill on it at its last report: the prefill a new request waits behind."""
    resident_adapters: frozenset[str] | None = None
    """Adapters in one of its slots now (None: unknown, `adapters` stands in)."""
    num_adapter_slots: int = 0
    """Its adapter slots; with `resident_adapters` it tells whether a load would evict another adapter."""
    num_inflight: int = 0
    """Requests this router sent it that have not finished (fresher than its stats)."""
    kv_blocks_used: int = 0
    """KV blocks its requests held at its last report (prefix-cached blocks nobody holds count as free)."""
    kv_bytes_per_block: int = 0
    """Bytes of K and V one block holds across all layers (0: unknown)."""
    kv_block_size: int = DEFAULT_KV_BLOCK_SIZE
    """Tokens per KV block. Workers do not report it yet, so this is the engine's default."""
    output_tokens_per_s: float = 0.0
    """Tokens it generated per second over its recent window, all requests together (0: unknown)."""
    kv_ledger: WorkerKvSnapshot | None = None
    """This router's running requests on it, with their predicted lengths (None: not tracked)."""
    prefix_block_hashes: frozenset[int] | None = None
    """`stable_block_hash` of the KV blocks its prefix cache holds (None: it published no summary)."""
    prefix_block_size: int = 0
    """Tokens per block of `prefix_block_hashes` (0: `kv_block_size`). The simulator caches prefixes at its trace's
    hash granularity (e.g. Mooncake's 512-token blocks), not at the KV block size."""


@dataclass(kw_only=True, frozen=True)
class ClusterView:
    """A snapshot of the workers a router can reach, grouped by deployment."""

    workers: Mapping[str, Sequence[WorkerView]] = field(default_factory=dict)
    """Deployment name -> its workers, every role."""
    index: ClusterIndex | None = field(default=None, compare=False)
    """Per-pool indexes over `workers` (`router.pool_index`), kept in step by whoever produces the view; None:
    policies scan every candidate. With one, `candidates` and `roles` read it instead of scanning. Derived data:
    two views with the same workers are equal whatever their indexes."""

    def candidates(self, deployment: str, role: str) -> list[WorkerView]:
        """Healthy workers of `deployment` in `role` (in no guaranteed order)."""
        if self.index is not None:
            pool = self.index.pool(deployment, role)
            return pool.candidates() if pool is not None else []
        return [w for w in self.workers.get(deployment, ()) if w.role == role and w.is_healthy]

    def roles(self, deployment: str) -> set[str]:
        if self.index is not None:
            return self.index.roles(deployment)
        return {w.role for w in self.workers.get(deployment, ())}


@dataclass(kw_only=True, frozen=True)
class PromptHashes:
    """A prompt's cacheable blocks as chained hashes, computed once by whoever built the request."""

    block_size: int
    """Tokens per hashed block."""
    hashes: tuple[int, ...]
    """Chained hashes of the prompt's leading full blocks (block i's hash covers blocks 0..i), in order."""


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
    predicted_output_p50: float | None = None
    """Median output length the router's length predictor expects (None: no predictor)."""
    predicted_output_p90: float | None = None
    """90th-percentile output length the predictor expects."""
    prompt_token_ids: tuple[int, ...] | None = None
    """The prompt's token ids when the router has them (prefix-cache affinity hashes them); None: text only."""
    prompt_hashes: PromptHashes | None = None
    """Precomputed block hashes of the prompt (the simulator has these from its trace, not token ids); used by
    prefix affinity for workers whose summary has the same block size."""


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
    deciding_terms: Mapping[str, str] = field(default_factory=dict)
    """Per pool role placed on, the policy term that most separated the chosen worker from the runner-up:
    `only_candidate` when it had no rival, `tie` when the worker id broke a tie; empty for policies without terms."""


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


def pick_least_loaded(
    candidates: Sequence[WorkerView], request: RouteRequest, view: ClusterView | None = None, role: str = ""
) -> tuple[WorkerView, dict[str, float]]:
    """The candidate with the lowest score; adapter residency breaks ties so LoRA requests stay warm.

    With `view.index`, only the workers tied at the least load are scored (read from the pool's load ordering);
    the decision is the same, and `scores` holds just those workers.
    """
    if not candidates:
        raise NoCapacityError(f"no healthy worker for deployment {request.deployment!r}")
    pool = view.index.pool(request.deployment, role) if view is not None and view.index is not None else None
    if pool is not None and len(pool):
        least = pool.ordering("load", load_score).first()
        tied = []
        for score, wid in pool.ordering("load", load_score):
            if score != least[0] or (tied and request.adapter is None):
                break
            tied.append(pool.views[wid])
        candidates = tied
    scores = {w.worker_id: load_score(w) for w in candidates}

    def key(w: WorkerView) -> tuple[float, float, str]:
        return scores[w.worker_id], adapter_load_cost(request.adapter, w), w.worker_id

    return min(candidates, key=key), scores


class LeastLoadedPolicy:
    """Least-loaded placement on each pool; prefill and decode are chosen independently when disaggregated."""

    name = "least_loaded"

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        return place_and_log(
            request, view, lambda req, candidates, role: pick_least_loaded(candidates, req, view, role), self.name
        )


def log_decision(policy: str, request: RouteRequest, decision: Decision) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return  # joining every candidate's score costs more than the decision itself at 1,000 workers
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


# --- Filter → score → pick, made explicit -------------------------------------------------------------------------
# Policies below share one shape: choose the pools (mixed, or prefill + decode), filter each pool's candidates,
# score them, pick the lowest. `place_by_role` owns the pool choice so every policy treats topologies alike.

Picker = Callable[[RouteRequest, Sequence[WorkerView], str], tuple[WorkerView, dict[str, float]]]
"""Picks one of the non-empty healthy candidates of one role; returns it and the scores it considered."""


def place_by_role(request: RouteRequest, view: ClusterView, pick: Picker, *, policy: str) -> Decision:
    """Place `request` on a mixed worker, or on a prefill and a decode worker, as `LeastLoadedPolicy` does.

    A deployment with any mixed worker is served by its mixed pool; otherwise it needs a healthy worker in
    both the prefill and the decode pool. Raises `NoCapacityError` (naming the pool) when a pool is empty.
    """
    roles = view.roles(request.deployment)
    if not roles:
        raise NoCapacityError(f"deployment {request.deployment!r} has no workers yet", retry_after_s=2.0)

    def pick_role(role: str) -> tuple[WorkerView, dict[str, float]]:
        candidates = view.candidates(request.deployment, role)
        if not candidates:
            raise NoCapacityError(f"no healthy {role} worker for deployment {request.deployment!r}")
        return pick(request, candidates, role)

    if "mixed" in roles:
        worker, scores = pick_role("mixed")
        return Decision(worker_id=worker.worker_id, reason=f"{policy} mixed", scores=scores)
    prefill, prefill_scores = pick_role("prefill")
    decode, decode_scores = pick_role("decode")
    return Decision(
        worker_id=decode.worker_id,
        prefill_worker_id=prefill.worker_id,
        reason=f"{policy} prefill+decode",
        scores={**prefill_scores, **decode_scores},
    )


def place_and_log(request: RouteRequest, view: ClusterView, pick: Picker, policy: str) -> Decision:
    """`place_by_role`, then the policy's one structured decision line."""
    decision = place_by_role(request, view, pick, policy=policy)
    log_decision(policy, request, decision)
    return decision


class Scorer(Protocol):
    """One term of a weighted policy: how unattractive `worker` is for `request`.

    Lower is better. Scores must be finite and should be pure functions of their arguments so decisions
    replay in the simulator. Scale matters: a `WeightedPolicy` adds `weight * score` across scorers.
    """

    name: str

    def score(self, request: RouteRequest, worker: WorkerView) -> float:
        """A finite score for placing `request` on `worker`; lower is better."""
        ...


class LoadScorer:
    """`load_score`: outstanding requests, with KV usage as a fraction-of-one tie-breaker."""

    name = "load"

    def score(self, request: RouteRequest, worker: WorkerView) -> float:
        return load_score(worker)


@dataclass(kw_only=True, frozen=True)
class PrefillBacklogScorer:
    """Queued prefill work in units of `unit_tokens()` prompt tokens: where a prompt would start soonest.

    Request counts mislead a prefill pool: one queued 8k-token prompt delays a newcomer more than three
    100-token ones. The unit (e.g. a typical prompt length) sets the exchange rate against other terms.
    """

    unit_tokens: Callable[[], float]
    """Tokens of backlog that score 1; read per decision so it can follow the traffic."""
    name: str = "prefill_backlog"
    """Scorer name in the policy's breakdown."""

    def score(self, request: RouteRequest, worker: WorkerView) -> float:
        return worker.num_pending_prefill_tokens / max(float(self.unit_tokens()), 1.0)


class KvPressureScorer:
    """KV usage in [0, 1]; steers long requests away from workers about to preempt."""

    name = "kv"

    def score(self, request: RouteRequest, worker: WorkerView) -> float:
        return worker.kv_usage


def predicted_peak_kv_blocks(request: RouteRequest, worker: WorkerView, *, use_p90: bool = False) -> int:
    """The peak KV (blocks) `worker` is forecast to hold if `request` joined its running batch now.

    The forecast covers the requests this router tracks there plus `request` (prompt + predicted output);
    blocks the worker reported that the ledger does not explain (other routers, stats lag) stay held.
    """
    snapshot = worker.kv_ledger or EMPTY_SNAPSHOT
    block_size = max(worker.kv_block_size, 1)
    untracked = max(worker.kv_blocks_used - snapshot.current_blocks(block_size), 0)
    remaining = predicted_remaining_tokens(
        num_generated=0,
        max_tokens=request.max_tokens,
        p50=request.predicted_output_p50,
        p90=request.predicted_output_p90,
        use_p90=use_p90,
    )
    forecast = snapshot.forecast(use_p90=use_p90, block_size=block_size)
    return untracked + forecast.peak_blocks_with(request.num_prompt_tokens_estimate, remaining)


@dataclass(kw_only=True, frozen=True)
class PredictedKvScorer:
    """Forecast peak KV occupancy (fraction of the pool) with the request added: length-aware balancing.

    Balances on the KV the running batches will still grow into, not on request counts: ten requests about
    to finish weigh less than two that will run for thousands of tokens. 0 when the pool size is unknown.
    """

    use_p90: bool = False
    """Forecast with the p90 output lengths (cautious) instead of the p50 (expected)."""
    name: str = "predicted_kv"
    """Scorer name in the policy's breakdown; unique within a policy."""

    def score(self, request: RouteRequest, worker: WorkerView) -> float:
        if worker.kv_blocks_total <= 0:
            return 0.0
        return predicted_peak_kv_blocks(request, worker, use_p90=self.use_p90) / worker.kv_blocks_total


def adapter_load_cost(adapter: str | None, worker: WorkerView) -> float:
    """What serving `adapter` costs `worker` before its first token, in [0, 1] (lower is cheaper).

    0: none needed or already in a slot; 0.5: registered and a slot is free (a copy into the slot); 0.75:
    registered but every slot is taken (the copy evicts an adapter other requests may want back); 1: not
    registered there (weights must be fetched). Without residency reports, registered counts as resident.
    """
    if adapter is None:
        return 0.0
    if adapter not in worker.adapters:
        return 1.0
    if worker.resident_adapters is None or adapter in worker.resident_adapters:
        return 0.0
    return 0.5 if len(worker.resident_adapters) < worker.num_adapter_slots else 0.75


class AdapterAffinityScorer:
    """`adapter_load_cost`: prefer workers holding the adapter, else the one where loading it costs least."""

    name = "adapter"

    def score(self, request: RouteRequest, worker: WorkerView) -> float:
        return adapter_load_cost(request.adapter, worker)


@dataclass(kw_only=True, frozen=True)
class WeightedTerm:
    """A scorer and how much it counts in a `WeightedPolicy`."""

    scorer: Scorer
    """The scorer; its `name` must be unique within one policy."""
    weight: float = 1.0
    """Multiplier on the scorer's output; finite and >= 0 (0 keeps it in the log without effect)."""
    roles: frozenset[str] | None = None
    """Pools the term applies to (`prefill`, `decode`, `mixed`); None applies it to every pool."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"weight of scorer {self.scorer.name!r} must be finite and >= 0, got {self.weight}")
        if self.roles is not None:
            unknown = set(self.roles) - {"prefill", "decode", "mixed"}
            if unknown or not self.roles:
                raise ValueError(
                    f"roles of scorer {self.scorer.name!r} must be a non-empty subset of prefill, "
                    f"decode, mixed; got {sorted(self.roles)}"
                )


WorkerPredicate = Callable[[RouteRequest, WorkerView], bool]
"""Extra filter on candidates, e.g. "has room for this request's KV"; True keeps the worker."""


class CandidateSearch(Protocol):
    """Narrows a `WeightedPolicy`'s scan of one pool to workers that provably hold a full scan's best two."""

    def select(
        self, request: RouteRequest, view: ClusterView, role: str, total: Callable[[WorkerView], float]
    ) -> Sequence[WorkerView] | None:
        """The workers to rank, which must include the full scan's winner and runner-up by (total, worker id);
        `total` is the policy's score of one worker. None: the policy scans every candidate."""
        ...


class WeightedPolicy:
    """Filter (healthy, role, optional predicate) → sum of weighted scores → lowest total, ties by worker id.

    Deterministic and stateless. The logged reason carries the winner's per-term breakdown, so a decision
    can be explained from one log line.
    """

    def __init__(
        self,
        terms: Sequence[WeightedTerm],
        *,
        predicate: WorkerPredicate | None = None,
        name: str = "weighted",
        search: CandidateSearch | None = None,
    ) -> None:
        self._init_terms(terms)
        self.predicate = predicate
        self.name = name
        self.search = search
        """Scores a provably sufficient subset of each pool instead of all of it (not combined with `predicate`)."""

    def _init_terms(self, terms: Sequence[WeightedTerm]) -> None:
        if not terms:
            raise ValueError("WeightedPolicy needs at least one WeightedTerm")
        for role in ("prefill", "decode", "mixed"):
            names = [t.scorer.name for t in terms if t.roles is None or role in t.roles]
            if len(set(names)) != len(names):
                raise ValueError(f"scorer names must be unique within a WeightedPolicy's {role} pool, got {names}")
        self.terms = tuple(terms)

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        breakdowns: dict[str, str] = {}

        def pick(req: RouteRequest, candidates: Sequence[WorkerView], role: str) -> tuple[WorkerView, dict[str, float]]:
            parts: dict[str, list[tuple[str, float, float]]] = {}
            totals: dict[str, float] = {}

            def total(w: WorkerView) -> float:
                value = totals.get(w.worker_id)
                if value is None:
                    p = parts[w.worker_id] = self._terms_for(req, w)
                    value = totals[w.worker_id] = math.fsum(weight * v for _, weight, v in p)
                return value

            kept = None
            if self.search is not None and self.predicate is None:
                kept = self.search.select(req, view, role, total)
            if kept is None:
                kept = [w for w in candidates if self.predicate is None or self.predicate(req, w)]
            if not kept:
                raise NoCapacityError(
                    f"no {role} worker of deployment {req.deployment!r} passes the {self.name} filter "
                    f"({len(candidates)} healthy)"
                )
            scores = {w.worker_id: total(w) for w in kept}
            ranked = sorted(kept, key=lambda w: (scores[w.worker_id], w.worker_id))
            chosen = ranked[0]
            runner_up = parts[ranked[1].worker_id] if len(ranked) > 1 else None
            deciders[role] = _deciding_term(parts[chosen.worker_id], runner_up)
            breakdowns[role] = "+".join(f"{n}={v:.3g}*{wt:g}" for n, wt, v in parts[chosen.worker_id])
            return chosen, scores

        deciders: dict[str, str] = {}
        decision = place_by_role(request, view, pick, policy=self.name)
        detail = " ".join(f"{role}[{terms}]" for role, terms in breakdowns.items())
        decision = dataclasses.replace(decision, reason=f"{decision.reason} {detail}", deciding_terms=deciders)
        log_decision(self.name, request, decision)
        return decision

    def _terms_for(self, request: RouteRequest, worker: WorkerView) -> list[tuple[str, float, float]]:
        parts = []
        for term in self.terms:
            if term.roles is not None and worker.role not in term.roles:
                continue
            value = float(term.scorer.score(request, worker))
            if not math.isfinite(value):
                raise ValueError(f"scorer {term.scorer.name!r} returned {value} for worker {worker.worker_id!r}")
            parts.append((term.scorer.name, term.weight, value))
        return parts


def _deciding_term(
    chosen: Sequence[tuple[str, float, float]], runner_up: Sequence[tuple[str, float, float]] | None
) -> str:
    """The term whose weighted score most favoured the winner over the runner-up (both lists in term order)."""
    if runner_up is None:
        return "only_candidate"
    gaps = {name: weight * (rival - own) for (name, weight, own), (_, _, rival) in zip(chosen, runner_up, strict=True)}
    name, gap = max(gaps.items(), key=lambda item: item[1], default=("tie", 0.0))
    return name if gap > 0 else "tie"

"""Predictive admission (Past-Future): place a request only where its KV fits for the whole life of the batch.

Before a request goes to a decode (or mixed) worker, the worker's running batch is forecast with the request
added (`predicted_peak_kv_blocks`). Workers whose forecast peak passes `headroom` of their KV pool are hidden
from the policy. When no worker is left, the request waits in its tenant's bounded queue; finish events
(and a periodic re-check, for capacity freed by others) drain the queues round-robin across tenants, FIFO
within one. A full tenant queue is `ResourceExhausted`; a wait past `max_wait_s` is `Unavailable`, both with
a `retry_after_s` estimated from the forecast completions.

`decide_admission` is the pure decision (admit on this view, or wait); `AdmissionController` does the waiting.
Admitting is synchronous with the placement (the caller's `place` records the request in its ledger before
the next one is looked at), so a burst cannot oversubscribe a worker between two forecasts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.errors import ResourceExhausted, Unavailable
from router.kv_forecast import EMPTY_SNAPSHOT
from router.policy import ClusterView, Decision, RouteRequest, WorkerView, predicted_peak_kv_blocks

logger = logging.getLogger(__name__)

SERVING_ROLES = ("decode", "mixed")
"""Roles whose KV a request holds for its whole decode; prefill workers only hold it briefly."""

MIN_RETRY_AFTER_S = 0.1
MAX_RETRY_AFTER_S = 60.0


@dataclass(kw_only=True, frozen=True)
class AdmissionConfig:
    """How much KV a forecast may use, how long and how many requests may wait for it."""

    enabled: bool = False
    """Whether a router runs admission at all (`RouterConfig.admission.enabled`); off, it places at once."""
    headroom: float = 0.95
    """Admit only while the forecast peak stays within this fraction of a worker's KV pool, in (0, 2] (above 1
    overcommits, betting that preemption by recompute is cheaper than waiting)."""
    max_queued_per_tenant: int = 64
    """Requests one tenant may have waiting for capacity; one more is `ResourceExhausted` (0: never wait)."""
    max_wait_s: float = 30.0
    """Longest a request waits for capacity before it fails with `Unavailable`."""
    use_p90: bool = True
    """Forecast with the p90 output lengths (fewer preemptions) instead of the p50 (more admitted)."""
    recheck_interval_s: float = 0.5
    """Waiters re-check this often even without a finish event: other routers' requests free KV too."""
    fallback_decode_steps_per_s: float = 20.0
    """Decode steps per second assumed when a worker has not reported a rate; turns steps into `retry_after_s`."""

    def __post_init__(self) -> None:
        if not (0 < self.headroom <= 2):
            raise ValueError(f"headroom must be in (0, 2] (above 1 overcommits the pool), got {self.headroom}")
        if self.max_queued_per_tenant < 0:
            raise ValueError(f"max_queued_per_tenant must be >= 0, got {self.max_queued_per_tenant}")
        if not (math.isfinite(self.max_wait_s) and self.max_wait_s >= 0):
            raise ValueError(f"max_wait_s must be finite and >= 0, got {self.max_wait_s}")
        if not (math.isfinite(self.recheck_interval_s) and self.recheck_interval_s > 0):
            raise ValueError(f"recheck_interval_s must be finite and > 0, got {self.recheck_interval_s}")
        if not (math.isfinite(self.fallback_decode_steps_per_s) and self.fallback_decode_steps_per_s > 0):
            raise ValueError(
                f"fallback_decode_steps_per_s must be finite and > 0, got {self.fallback_decode_steps_per_s}"
            )


# --- pure helpers ------------------------------------------------------------------------------------------------


def kv_capacity_blocks(worker: WorkerView, config: AdmissionConfig) -> int:
    """Blocks a forecast may reach on `worker`."""
    return math.floor(worker.kv_blocks_total * config.headroom)


def fits(request: RouteRequest, worker: WorkerView, config: AdmissionConfig) -> bool:
    """Whether `worker` can take `request` without its forecast peak passing the headroom.

    A worker with an unknown pool size, or with nothing of ours running and nothing reported in use, always
    fits: refusing there would make a request larger than any pool wait forever instead of failing in the engine.
    """
    if worker.kv_blocks_total <= 0:
        return True
    snapshot = worker.kv_ledger or EMPTY_SNAPSHOT
    if snapshot.num_requests == 0 and worker.kv_blocks_used == 0:
        return True
    peak = predicted_peak_kv_blocks(request, worker, use_p90=config.use_p90)
    return peak <= kv_capacity_blocks(worker, config)


def serving_candidates(request: RouteRequest, view: ClusterView) -> list[WorkerView]:
    """Healthy decode and mixed workers of the request's deployment."""
    return [w for role in SERVING_ROLES for w in view.candidates(request.deployment, role)]


def admissible_view(request: RouteRequest, view: ClusterView, config: AdmissionConfig) -> ClusterView:
    """`view` without the decode and mixed workers of the request's deployment that cannot take it."""
    workers = view.workers.get(request.deployment, ())
    kept = [w for w in workers if w.role not in SERVING_ROLES or (w.is_healthy and fits(request, w, config))]
    return ClusterView(workers={**view.workers, request.deployment: kept})


def decode_steps_per_s(worker: WorkerView, config: AdmissionConfig) -> float:
    """Decode steps per second: the worker's token rate shared by its running batch, or the configured guess."""
    if worker.output_tokens_per_s > 0:
        return worker.output_tokens_per_s / max(worker.num_running, 1)
    return config.fallback_decode_steps_per_s


def estimate_retry_after_s(request: RouteRequest, workers: Sequence[WorkerView], config: AdmissionConfig) -> float:
    """Seconds until predicted completions on the best worker free the blocks `request` is short of.

    Falls back to one re-check interval when the forecast cannot tell (the shortfall is KV we do not track).
    """
    best = math.inf
    for worker in workers:
        if worker.kv_blocks_total <= 0:
            continue
        snapshot = worker.kv_ledger or EMPTY_SNAPSHOT
        shortfall = predicted_peak_kv_blocks(request, worker, use_p90=config.use_p90) - kv_capacity_blocks(
            worker, config
        )
        steps = snapshot.steps_until_freed(shortfall, use_p90=config.use_p90, block_size=max(worker.kv_block_size, 1))
        if steps is not None:
            best = min(best, steps / decode_steps_per_s(worker, config))
    if not math.isfinite(best):
        best = config.recheck_interval_s
    return min(max(best, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)


@dataclass(kw_only=True, frozen=True)
class AdmissionVerdict:
    """The pure admission decision for one request over one view: place now on `view`, or wait."""

    view: ClusterView | None
    """The view to place on (the admissible one, or the whole view when the deployment has no serving worker,
    so the policy reports the empty pool); None: the request must wait for capacity."""
    candidates: tuple[WorkerView, ...] = ()
    """The healthy serving (decode and mixed) workers of the request's deployment, before the KV filter."""
    retry_after_s: float = 0.0
    """When waiting: seconds until forecast completions should free the KV it is short of."""

    @property
    def is_admitted(self) -> bool:
        return self.view is not None


def decide_admission(request: RouteRequest, view: ClusterView, config: AdmissionConfig) -> AdmissionVerdict:
    """Admit `request` on the workers of `view` its forecast KV fits, or say it must wait and for how long.

    Pure (no clock, no queue, no I/O): the router's `AdmissionController` and the simulator both call it; the
    waiting, its fairness and its deadlines are the caller's.
    """
    candidates = tuple(serving_candidates(request, view))
    if not candidates:
        return AdmissionVerdict(view=view)  # nothing to wait for: the policy reports the empty pool
    admissible = admissible_view(request, view, config)
    if serving_candidates(request, admissible):
        return AdmissionVerdict(view=admissible, candidates=candidates)
    retry_after_s = estimate_retry_after_s(request, candidates, config)
    return AdmissionVerdict(view=None, candidates=candidates, retry_after_s=retry_after_s)


# --- the controller ----------------------------------------------------------------------------------------------

ViewFn = Callable[[], ClusterView]
"""The router's current view, with its ledger snapshots in `WorkerView.kv_ledger`."""
PlaceFn = Callable[[ClusterView], Decision]
"""Runs the policy on an admissible view and records the placement in the ledger; raises like `Policy.route`."""


@dataclass(eq=False)
class _Waiter:
    request: RouteRequest
    view: ViewFn
    place: PlaceFn
    future: asyncio.Future[Decision]
    queued_at: float


class AdmissionController:
    """Gates placement on the KV forecast and holds what does not fit in per-tenant queues.

    Not thread-safe: one event loop drives it. `admit` returns the placement; the caller reports every
    finished, cancelled or failed request through `notify_capacity_freed` so waiters move on.
    """

    def __init__(self, config: AdmissionConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or AdmissionConfig()
        self.clock = clock
        self._init_queues()

    def _init_queues(self) -> None:
        # Tenant order is the round-robin order: a tenant served moves to the back.
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()

    def num_queued(self, tenant: str | None = None) -> int:
        if tenant is not None:
            return len(self._queues.get(tenant, ()))
        return sum(len(q) for q in self._queues.values())

    async def admit(self, request: RouteRequest, *, view: ViewFn, place: PlaceFn) -> Decision:
        """Place `request` on a worker its KV fits on, waiting in its tenant's queue for one if need be.

        Raises `ResourceExhausted` when the tenant's queue is full, `Unavailable` when the wait passes
        `max_wait_s`, and whatever `place` raises (e.g. `Unavailable` for an empty pool) unchanged.
        """
        verdict = decide_admission(request, view(), self.config)
        if not verdict.candidates:
            return place(verdict.view)  # nothing to wait for: the policy reports the empty pool
        # Others already waiting go first (FIFO per tenant), unless nobody may wait at all.
        if verdict.is_admitted and (not self._queues or self.config.max_queued_per_tenant == 0):
            decision = place(verdict.view)
            self._log("admit", request, worker=decision.worker_id, candidates=verdict.candidates)
            return decision
        return await self._wait(request, view=view, place=place, candidates=list(verdict.candidates))

    def notify_capacity_freed(self) -> None:
        """A tracked request left a worker: admit waiters that fit now, round-robin across tenants."""
        progress = True
        while progress and self._queues:
            progress = False
            for tenant in list(self._queues):
                progress = self._try_admit(self._queues[tenant][0]) or progress

    async def _wait(
        self, request: RouteRequest, *, view: ViewFn, place: PlaceFn, candidates: list[WorkerView]
    ) -> Decision:
        queue = self._queues.get(request.tenant, ())
        if len(queue) >= self.config.max_queued_per_tenant:
            # The tenant's next slot opens when its head is admitted: estimate for the head.
            head = queue[0].request if queue else request
            retry_after_s = estimate_retry_after_s(head, candidates, self.config)
            self._log("reject", request, candidates=candidates, retry_after_s=retry_after_s)
            raise ResourceExhausted(
                f"tenant {request.tenant!r} already has {self.config.max_queued_per_tenant} requests waiting for KV "
                f"capacity on deployment {request.deployment!r}",
                retry_after_s=retry_after_s,
            )
        waiter = _Waiter(
            request=request,
            view=view,
            place=place,
            future=asyncio.get_running_loop().create_future(),
            queued_at=self.clock(),
        )
        self._queues.setdefault(request.tenant, deque()).append(waiter)
        self.notify_capacity_freed()  # others queued ahead may fit; round-robin decides who goes first
        if not waiter.future.done():
            self._log("queue", request, candidates=candidates)
        deadline = waiter.queued_at + self.config.max_wait_s
        try:
            while not waiter.future.done():
                left = deadline - self.clock()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(asyncio.shield(waiter.future), min(left, self.config.recheck_interval_s))
                except TimeoutError:
                    self.notify_capacity_freed()
            if waiter.future.done():
                return waiter.future.result()
            candidates = serving_candidates(request, view())
            retry_after_s = estimate_retry_after_s(request, candidates, self.config)
            self._log("timeout", request, candidates=candidates, retry_after_s=retry_after_s)
            raise Unavailable(
                f"no worker of deployment {request.deployment!r} had KV capacity within {self.config.max_wait_s:g}s",
                retry_after_s=retry_after_s,
            )
        finally:
            if not waiter.future.done():
                self._remove(waiter)

    def _try_admit(self, waiter: _Waiter) -> bool:
        """Place the head of a tenant's queue if it fits now (or fail it if placing raised); False: still queued."""
        try:
            verdict = decide_admission(waiter.request, waiter.view(), self.config)
            if verdict.view is None:
                return False
            decision = waiter.place(verdict.view)
            candidates = verdict.candidates
        except Exception as exc:  # the waiter's own failure (e.g. its pool emptied) is its answer, not ours
            self._pop_head(waiter)
            waiter.future.set_exception(exc)
            return True
        self._pop_head(waiter)
        waiter.future.set_result(decision)
        wait_ms = (self.clock() - waiter.queued_at) * 1e3
        self._log("admit", waiter.request, worker=decision.worker_id, candidates=candidates, wait_ms=wait_ms)
        return True

    def _pop_head(self, waiter: _Waiter) -> None:
        """Take the head of its tenant's queue; the tenant goes to the back of the round-robin order."""
        tenant = waiter.request.tenant
        queue = self._queues[tenant]
        queue.popleft()
        if queue:
            self._queues.move_to_end(tenant)
        else:
            del self._queues[tenant]

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.request.tenant)
        if queue is None or waiter not in queue:
            return
        was_head = queue[0] is waiter
        queue.remove(waiter)
        if not queue:
            del self._queues[waiter.request.tenant]
        if was_head:
            self.notify_capacity_freed()  # the tenant's next request may fit where this one did not

    def _log(
        self,
        decision: str,
        request: RouteRequest,
        *,
        candidates: Sequence[WorkerView],
        worker: str = "-",
        retry_after_s: float | None = None,
        wait_ms: float = 0.0,
    ) -> None:
        forecasts = ",".join(
            f"{w.worker_id}:{predicted_peak_kv_blocks(request, w, use_p90=self.config.use_p90)}/"
            f"{kv_capacity_blocks(w, self.config)}"
            for w in candidates
        )
        logger.info(
            "admission decision=%s request_id=%s tenant=%s deployment=%s worker=%s peak_blocks=%s queued=%d "
            "tenant_queued=%d wait_ms=%.1f retry_after_s=%s",
            decision,
            request.request_id,
            request.tenant,
            request.deployment,
            worker,
            forecasts or "-",
            self.num_queued(),
            self.num_queued(request.tenant),
            wait_ms,
            f"{retry_after_s:.2f}" if retry_after_s is not None else "-",
        )

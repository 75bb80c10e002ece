"""One placement path for the router and the simulator: predict → admit → place → ledger.

`RouterCore` and `sim.simulator.Simulator` both place every request through a `PlacementCore`, so a decision the
simulator makes is the one the router would make on the same view. The core has no clock, no asyncio and no I/O:
admission here is the pure `decide_admission` (admit on this view, or wait); the waiting itself (per-tenant
queues, deadlines, gRPC-layer refusals) is `AdmissionController`'s in the router and the event loop's in the
simulator.

`ViewOverlay` is the router's view: the directory's `ClusterView` plus what only this router knows (its in-flight
counts and KV ledger), updated per worker when those change instead of rebuilt per request.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from router.admission import AdmissionConfig, AdmissionVerdict, decide_admission
from router.kv_forecast import KvLedger
from router.length_predictor import Features, LengthPredictor
from router.policy import ClusterView, Decision, Policy, RouteRequest, WorkerView
from router.pool_index import ClusterIndex

logger = logging.getLogger(__name__)


class PlacementCore:
    """Predicts, admits, places and tracks requests; the same object in the router and the simulator.

    State it keeps: the `KvLedger` of the requests it placed (and the predictor's learned lengths, when one is
    given). Everything else is a pure function of the request and the view the caller passes in.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        predictor: LengthPredictor | None = None,
        admission: AdmissionConfig | None = None,
        ledger: KvLedger | None = None,
    ) -> None:
        self.policy = policy
        self.predictor = predictor
        """None: no length prediction (requests keep `predicted_output_p50/p90` as given)."""
        self.admission = admission
        """None: every request is admitted on the whole view."""
        self.ledger = ledger if ledger is not None else KvLedger()

    def predict(self, request: RouteRequest, features: Features | None = None) -> RouteRequest:
        """`request` with the predictor's output lengths (p50, p90); unchanged without a predictor."""
        if self.predictor is None:
            return request
        prediction = self.predictor.predict(request, features)
        return dataclasses.replace(request, predicted_output_p50=prediction.p50, predicted_output_p90=prediction.p90)

    def admit(self, request: RouteRequest, view: ClusterView) -> AdmissionVerdict:
        """The pure admission decision: the view to place on, or wait (with a retry-after estimate)."""
        if self.admission is None:
            return AdmissionVerdict(view=view)
        return decide_admission(request, view, self.admission)

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        """The policy's decision alone, for a request already tracked (placed again after it lost a worker; the
        caller then `move`s its ledger entry). Raises `NoCapacityError`; the policy logs the decision."""
        return self.policy.route(request, view)

    def place(self, request: RouteRequest, view: ClusterView, ledger_key: str) -> Decision:
        """Run the policy on `view` and track the request in the ledger under `ledger_key` (unique per attempt).

        Raises `NoCapacityError` like `Policy.route`; nothing is tracked then. The policy logs the decision.
        """
        decision = self.route(request, view)
        self.ledger.place(
            ledger_key,
            worker_id=decision.worker_id,
            num_prompt_tokens=request.num_prompt_tokens_estimate,
            max_tokens=request.max_tokens,
            predicted_output_p50=request.predicted_output_p50,
            predicted_output_p90=request.predicted_output_p90,
        )
        return decision

    def move(self, ledger_key: str, worker_id: str) -> None:
        """The request now runs on `worker_id` (failover, decode reroute or migration); its counts go with it."""
        if not self.ledger.move(ledger_key, worker_id):
            raise ValueError(f"ledger key {ledger_key!r} is not tracked; place it before moving it")

    def finish(self, ledger_key: str) -> bool:
        """Stop tracking the request (finished, cancelled, failed or restarting); True if it was tracked."""
        return self.ledger.finish(ledger_key)

    def observe(self, request: RouteRequest, num_output_tokens: int, features: Features | None = None) -> None:
        """A request completed (`stop` or `length`) with `num_output_tokens`: teach the predictor."""
        if self.predictor is not None:
            self.predictor.observe(request, num_output_tokens, features)


class ViewOverlay:
    """The directory's view with this router's in-flight counts and ledger snapshots, kept incrementally.

    `mark(worker_id)` after a worker's count or ledger entries change; `view(base)` then re-derives only the
    marked workers (and, when the directory hands over a new view, only the workers whose `WorkerView` it
    replaced). The returned `ClusterView` is updated in place: it is valid until the next `view` call, which is
    how the policies use it (they decide synchronously).
    """

    def __init__(self, inflight: Counter[str], ledger: KvLedger) -> None:
        self.inflight = inflight
        self.ledger = ledger
        self._init_cache()

    def _init_cache(self) -> None:
        self._base: ClusterView | None = None
        self._base_workers: dict[str, WorkerView] = {}
        """Worker id -> the directory's `WorkerView` the overlaid one was derived from."""
        self._slots: dict[str, tuple[list[WorkerView], int]] = {}
        """Worker id -> (its deployment's list in `_view`, its index there)."""
        self._dirty: set[str] = set()
        self._index = ClusterIndex()
        """Per-pool indexes over the overlaid views, updated per changed worker (policies then score a few)."""
        self._view = ClusterView(index=self._index)

    def mark(self, worker_ids: Iterable[str]) -> None:
        self._dirty.update(worker_ids)

    def view(self, base: ClusterView) -> ClusterView:
        if base is not self._base:
            self._rebase(base)
            self._dirty.clear()  # the rebase derived every worker it did not reuse
        for worker_id in self._dirty:
            slot = self._slots.get(worker_id)
            if slot is not None:
                self._update_worker(self._overlay(self._base_workers[worker_id]))
        self._dirty.clear()
        return self._view

    def _rebase(self, base: ClusterView) -> None:
        """A new directory view: reuse the overlaid views of workers whose base view did not change."""
        old_base, old_view = self._base_workers, {wid: lst[i] for wid, (lst, i) in self._slots.items()}
        self._base, self._base_workers, self._slots = base, {}, {}
        lists: dict[str, list[WorkerView]] = {}
        for deployment, workers in base.workers.items():
            out = lists[deployment] = []
            for w in workers:
                wid = w.worker_id
                reuse = old_base.get(wid) is w and wid not in self._dirty
                self._base_workers[wid] = w
                self._slots[wid] = (out, len(out))
                view = old_view[wid] if reuse else self._overlay(w)
                out.append(view)
                self._index.update(view)  # a no-op for a reused view
        for wid in old_base.keys() - self._base_workers.keys():
            self._index.remove(wid)
        self._view = ClusterView(workers=lists, index=self._index)

    def _overlay(self, w: WorkerView) -> WorkerView:
        num_inflight = self.inflight[w.worker_id]
        if not num_inflight and not self.ledger.num_tracked(w.worker_id):
            return w
        return dataclasses.replace(w, num_inflight=num_inflight, kv_ledger=self.ledger.snapshot(w.worker_id))

    def _update_worker(self, view: WorkerView) -> None:
        """The one place a worker's overlaid view changes between rebases (per-pool indexes hook in here)."""
        out, i = self._slots[view.worker_id]
        out[i] = view
        self._index.update(view)


def without_workers(view: ClusterView, lost: Sequence[str] | frozenset[str]) -> ClusterView:
    """A copy of `view` in which the workers in `lost` are unhealthy (a request is placed again without them)."""
    return ClusterView(
        workers={
            dep: [dataclasses.replace(w, is_healthy=False) if w.worker_id in lost else w for w in workers]
            for dep, workers in view.workers.items()
        }
    )

"""What the routing policy sees: `SimWorker`s adapted to `WorkerView`s, kept up to date incrementally.

Rebuilding every `WorkerView` for every request costs O(workers) per decision; instead the simulator marks the
workers whose state changed (`mark`) and only those views are rebuilt before the next decision (`view`). The
ledger snapshots come from the placement core's own `KvLedger` (the router's), whose token counts are synced from
the modelled workers when a view is rebuilt.
"""

from __future__ import annotations

from collections.abc import Mapping

from control_plane.migration_policy import WorkerView as MigrationWorkerView
from router.kv_forecast import KvLedger, WorkerKvSnapshot, predicted_remaining_tokens
from router.policy import ClusterView, WorkerView
from router.pool_index import ClusterIndex
from sim.worker import SimRequest, SimWorker
from workers.messages import RunningRequestInfo


class ViewTracker:
    """Owns the policy's view of the workers and the per-worker bookkeeping a router keeps."""

    def __init__(
        self,
        workers: Mapping[str, SimWorker],
        *,
        deployment: str,
        kv_bytes_per_token: int,
        ledger: KvLedger | None,
        ledger_refresh_s: float,
    ) -> None:
        self.workers = workers
        self.deployment = deployment
        self.kv_bytes_per_token = kv_bytes_per_token
        self.ledger, self.ledger_refresh_s = ledger, ledger_refresh_s
        """`ledger`: the placement core's, keyed by request id; None: policies get no ledger (not length-aware)."""
        self.assigned: dict[str, dict[int, SimRequest]] = {wid: {} for wid in workers}
        """Per decode (or mixed) worker, the requests placed on it that have not finished (the ledger's members)."""
        self.inflight: dict[str, int] = dict.fromkeys(workers, 0)
        """Per decode worker, requests routed to it that are still in prefill elsewhere."""
        self.dirty: set[str] = set()
        self.now = 0.0
        self._ledger_cache: dict[str, tuple[float, WorkerKvSnapshot]] = {}
        self._views: list[WorkerView] = []
        self._index: dict[str, int] = {}
        for wid, w in workers.items():
            self._index[wid] = len(self._views)
            self._views.append(self._make_view(w))
        self._cluster = ClusterView(workers={deployment: self._views}, index=ClusterIndex(self._views))

    def mark(self, worker_id: str) -> None:
        self.dirty.add(worker_id)

    def assign(self, worker_id: str, r: SimRequest) -> None:
        self.assigned[worker_id][r.index] = r
        self._ledger_cache.pop(worker_id, None)
        self.dirty.add(worker_id)

    def unassign(self, worker_id: str, r: SimRequest) -> bool:
        """Forget `r` on `worker_id`; True if it was assigned there."""
        self._ledger_cache.pop(worker_id, None)
        self.dirty.add(worker_id)
        return self.assigned[worker_id].pop(r.index, None) is not None

    def view(self, now: float) -> ClusterView:
        """The cluster as of `now`, rebuilding only the views of workers marked since the last call."""
        self.now = now
        for wid in self.dirty:
            self._update_worker(self._make_view(self.workers[wid]))
        self.dirty.clear()
        return self._cluster

    def _update_worker(self, view: WorkerView) -> None:
        """The one place a worker's view changes (per-pool indexes hook in here); the list is updated in place."""
        self._views[self._index[view.worker_id]] = view
        self._cluster.index.update(view)

    def _ledger(self, w: SimWorker) -> WorkerKvSnapshot | None:
        """The router's ledger of `w`; token counts may lag by `ledger_refresh_s`, membership never does."""
        if self.ledger is None:
            return None
        cached = self._ledger_cache.get(w.worker_id)
        if cached is not None and self.now - cached[0] < self.ledger_refresh_s:
            return cached[1]
        for r in self.assigned[w.worker_id].values():
            self.ledger.set_generated(r.request_id, r.num_generated)
        snapshot = self.ledger.snapshot(w.worker_id)
        self._ledger_cache[w.worker_id] = (self.now, snapshot)
        return snapshot

    def _make_view(self, w: SimWorker) -> WorkerView:
        return WorkerView(
            worker_id=w.worker_id,
            deployment=self.deployment,
            role=w.role,
            is_healthy=w.is_healthy,
            num_running=w.num_running,
            num_waiting=w.num_waiting,
            kv_usage=w.used_blocks / w.kv_blocks,
            kv_blocks_total=w.kv_blocks,
            kv_blocks_used=w.used_blocks,
            num_inflight=self.inflight[w.worker_id],
            kv_bytes_per_block=self.kv_bytes_per_token * w.block_size,
            kv_block_size=w.block_size,
            kv_ledger=self._ledger(w),
            num_pending_prefill_tokens=w.num_pending_prefill_tokens,
            prefix_block_hashes=w.prefix_block_hashes(),
            prefix_block_size=w.prefix_block_size,
        )


def migration_view(w: SimWorker, *, max_tokens: int, predicted: dict[str, int]) -> MigrationWorkerView:
    """`w` as the migration policy sees a worker (its stats and `LLMWorker.running_requests`); fills `predicted`
    with each running request's remaining length from its predicted p50/p90, never its true length."""
    running = []
    # Decode progress inside a fast-forward run is settled only at step ends; sizes here are from the last one.
    for r in w.decoding:
        if r.is_migrating:
            continue
        running.append(
            RunningRequestInfo(
                request_id=r.request_id,
                num_prompt_tokens=r.prompt_len,
                num_output_tokens=r.num_generated,
                max_tokens=max_tokens,
                priority=0,
                num_blocks=r.num_blocks,
            )
        )
        predicted[r.request_id] = predicted_remaining_tokens(
            num_generated=r.num_generated,
            max_tokens=max_tokens,
            p50=r.predicted_p50,
            p90=r.predicted_p90,
            use_p90=False,
        )
    return MigrationWorkerView(
        worker_id=w.worker_id,
        kv_blocks_total=w.kv_blocks,
        kv_blocks_used=w.used_blocks,
        block_size=w.block_size,
        requests=tuple(running),
    )

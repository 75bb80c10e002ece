"""What the routing policy sees: a `ClusterView` kept up to date incrementally, plus the router's KV ledger.

Rebuilding every `WorkerView` for every request costs O(workers) per decision; instead the simulator marks the
workers whose state changed (`mark`) and only those views are rebuilt before the next decision (`view`).
"""

from __future__ import annotations

from collections.abc import Mapping

from router.kv_forecast import RequestKv, WorkerKvSnapshot
from router.policy import ClusterView, WorkerView
from sim.worker import SimRequest, SimWorker


class ViewTracker:
    """Owns the policy's view of the workers and the per-worker bookkeeping a router keeps."""

    def __init__(
        self,
        workers: Mapping[str, SimWorker],
        *,
        deployment: str,
        max_tokens: int,
        kv_bytes_per_token: int,
        track_ledger: bool,
        ledger_refresh_s: float,
    ) -> None:
        self.workers = workers
        self.deployment, self.max_tokens = deployment, max_tokens
        self.kv_bytes_per_token = kv_bytes_per_token
        self.track_ledger, self.ledger_refresh_s = track_ledger, ledger_refresh_s
        self.assigned: dict[str, dict[int, SimRequest]] = {wid: {} for wid in workers}
        """Per decode (or mixed) worker, the requests routed to it that have not finished: the router's ledger."""
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
        self._cluster = ClusterView(workers={deployment: self._views})

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
            self._views[self._index[wid]] = self._make_view(self.workers[wid])
        self.dirty.clear()
        return self._cluster

    def _ledger(self, w: SimWorker) -> WorkerKvSnapshot:
        """The router's ledger of `w`; token counts may lag by `ledger_refresh_s`, membership never does."""
        cached = self._ledger_cache.get(w.worker_id)
        if cached is not None and self.now - cached[0] < self.ledger_refresh_s:
            return cached[1]
        snapshot = WorkerKvSnapshot(
            requests=tuple(
                RequestKv(
                    num_prompt_tokens=r.prompt_len,
                    num_generated=r.num_generated,
                    max_tokens=self.max_tokens,
                    predicted_output_p50=r.predicted_p50,
                    predicted_output_p90=r.predicted_p90,
                )
                for r in self.assigned[w.worker_id].values()
            )
        )
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
            kv_ledger=self._ledger(w) if self.track_ledger else None,
            num_pending_prefill_tokens=w.num_pending_prefill_tokens,
        )

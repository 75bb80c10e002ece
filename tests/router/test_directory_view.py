"""The router's directory keeps its `ClusterView`: a worker's `WorkerView` is rebuilt when its stats arrive or its
health changes, not on every request, and the view still goes stale workers out of placement on time."""

from __future__ import annotations

import asyncio

from inprocess_workers import idle_stats

from router.server import RayDirectory, RouterConfig, RoutingState, WorkerEntry
from router.table import DeploymentRoute, RoutingTable
from workers.messages import WorkerStats


class _Worker:
    """A worker actor's `stats.remote()`: answers with its current load while `answering`."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.num_running = 0
        self.answering = True
        self.stats = self

    def remote(self):
        async def answer() -> WorkerStats:
            if not self.answering:
                await asyncio.sleep(3600)  # never answers within the stats timeout
            return idle_stats(self.worker_id, num_running=self.num_running)

        return asyncio.ensure_future(answer())


class _ControlPlane:
    def __init__(self, workers: list[_Worker]) -> None:
        self.workers = workers
        self.routing_state = self

    def remote(self):
        state = RoutingState(
            table=RoutingTable(deployments={"chat": DeploymentRoute(name="chat")}),
            workers={
                w.worker_id: WorkerEntry(worker_id=w.worker_id, deployment="chat", role="mixed", handle=w)
                for w in self.workers
            },
        )
        future = asyncio.get_running_loop().create_future()
        future.set_result(state)
        return future


def test_the_view_is_kept_between_requests_and_rebuilt_per_worker_when_stats_arrive():
    workers = [_Worker(f"w{i}") for i in range(3)]
    control_plane = _ControlPlane(workers)

    async def run() -> None:
        directory = RayDirectory(RouterConfig(stats_timeout_s=0.05, stats_stale_limit_s=0.3), control_plane)
        await directory.refresh_table()
        assert [w.is_healthy for w in directory.view().workers["chat"]] == [False] * 3  # no stats yet
        await directory.refresh_stats()
        view = directory.view()
        assert [w.is_healthy for w in view.workers["chat"]] == [True] * 3
        assert directory.view() is view  # nothing changed: the same object, nothing rebuilt

        # Only the workers whose stats arrive get a new view: w1's stats time out (slow, not dead).
        workers[0].num_running = 4
        workers[1].answering = False
        await directory.refresh_stats()
        after = directory.view().workers["chat"]
        assert after[0].num_running == 4
        assert after[1] is view.workers["chat"][1]  # kept, on its last-known load

        # A table refresh with the same workers keeps every view.
        await directory.refresh_table()
        assert directory.view().workers["chat"][1] is after[1]

        # A lost worker leaves placement at once; one whose stats stay late past the limit leaves on time.
        directory.mark_unhealthy("w2")
        assert not directory.view().workers["chat"][2].is_healthy
        await asyncio.sleep(0.35)
        workers[1].answering = True
        stale = directory.view().workers["chat"]
        assert [w.is_healthy for w in stale] == [False, False, False]  # w0 and w1 went stale, w2 is lost
        await directory.refresh_stats()
        assert [w.is_healthy for w in directory.view().workers["chat"]] == [True, True, True]

        # A new worker in the table joins the view.
        workers.append(_Worker("w3"))
        await directory.refresh_table()
        await directory.refresh_stats()
        assert [w.worker_id for w in directory.view().workers["chat"]] == ["w0", "w1", "w2", "w3"]

    asyncio.run(run())

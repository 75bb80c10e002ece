"""The router's directory tells a slow worker (stats late: still placed, on its last-known load) from a dead one
(stats fail: out of placement at once, until it answers again)."""

from __future__ import annotations

import asyncio

from inprocess_workers import idle_stats

from router.server import RayDirectory, RouterConfig, RoutingState, WorkerEntry
from router.table import DeploymentRoute, RoutingTable
from workers.engine.errors import EngineDeadError
from workers.messages import WorkerStats


def _stats(num_running: int) -> WorkerStats:
    return idle_stats(num_running=num_running)


class _Worker:
    """A worker actor's `stats.remote()` as the directory sees it: it answers, answers late, or fails."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: BaseException | None = None
        self.num_running = 3
        self.stats = self

    def remote(self):
        async def answer() -> WorkerStats:
            await self.gate.wait()
            if self.error is not None:
                raise self.error
            return _stats(self.num_running)

        return asyncio.ensure_future(answer())


class _ControlPlane:
    def __init__(self, worker: _Worker) -> None:
        state = RoutingState(
            table=RoutingTable(deployments={"chat": DeploymentRoute(name="chat")}),
            workers={"w-0": WorkerEntry(worker_id="w-0", deployment="chat", role="mixed", handle=worker)},
        )
        self.routing_state = self
        self._state = state

    def remote(self):
        future = asyncio.get_running_loop().create_future()
        future.set_result(self._state)
        return future


def test_late_stats_keep_a_worker_placeable_and_failed_stats_take_it_out():
    worker = _Worker()

    async def run() -> None:
        directory = RayDirectory(RouterConfig(stats_timeout_s=0.05), _ControlPlane(worker))
        await directory.refresh_table()
        await directory.refresh_stats()
        (view,) = directory.view().workers["chat"]
        assert view.is_healthy and view.num_running == 3

        # Late past the stats timeout, as on a starved machine: still placeable, on its last-known load.
        worker.gate.clear()
        await directory.refresh_stats()
        (view,) = directory.view().workers["chat"]
        assert view.is_healthy and view.num_running == 3

        # An error for an answer (its engine loop died): out of placement at once.
        worker.error = EngineDeadError("the engine loop died")
        worker.gate.set()
        await directory.refresh_stats()
        assert not directory.view().workers["chat"][0].is_healthy

        # Answering again (e.g. its replacement): back in, with fresh load.
        worker.error, worker.num_running = None, 1
        await directory.refresh_stats()
        (view,) = directory.view().workers["chat"]
        assert view.is_healthy and view.num_running == 1

    asyncio.run(run())

"""The `ControlPlane` actor: state store, admin gRPC service, router replicas and the reconcile loop.

It is a named, detached actor (`raylane-control-plane` in namespace `raylane`), so it outlives the
`raylane up` process; the CLI talks to it over gRPC, routers over Ray.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
import ray

from control_plane.admin import AdminServicer
from control_plane.config import ControlPlaneConfig
from control_plane.controller import Controller
from control_plane.learned_state import load_learned, save_learned
from control_plane.redis_server import EmbeddedRedis, connect
from control_plane.spec import TenantSpec
from protos.raylane.v1 import control_pb2, control_pb2_grpc
from router.grpc_server import start_grpc_server
from router.server import CONTROL_PLANE_ACTOR, NAMESPACE, RouterActor, RouterConfig, RoutingState

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class ClusterInfo:
    """Where a running cluster can be reached."""

    admin_address: str
    router_addresses: tuple[str, ...]
    state_url: str


@ray.remote(num_cpus=0, max_concurrency=1000)
class ControlPlane:
    """Owns the cluster's desired state and makes the actors follow it. Call `start` once."""

    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self._redis: EmbeddedRedis | None = None
        self.controller: Controller | None = None
        self._admin_server: grpc.aio.Server | None = None
        self._routers: list[Any] = []
        self._loop_task: asyncio.Task | None = None
        self.info: ClusterInfo | None = None

    async def start(self) -> ClusterInfo:
        if self.info is not None:
            return self.info
        self.config.state_path.mkdir(parents=True, exist_ok=True)
        store, self._redis = await asyncio.to_thread(connect, self.config.redis_url, self.config.state_path)
        self.controller = Controller(store, rebalance_interval_s=self.config.rebalance_interval_s)
        state_url = self.config.redis_url or (self._redis.url if self._redis else "")
        # Converge once before serving, so routers start with the pools that already exist.
        await asyncio.to_thread(self.controller.reconcile_once)
        admin_address = await self._start_admin()
        router_addresses = await self._start_routers()
        self.info = ClusterInfo(
            admin_address=admin_address, router_addresses=tuple(router_addresses), state_url=state_url
        )
        self._loop_task = asyncio.create_task(self._reconcile_forever())
        store.append_event("control_plane_started", admin=admin_address)
        logger.info("control plane started admin=%s routers=%s state=%s", admin_address, router_addresses, state_url)
        return self.info

    async def _start_admin(self) -> str:
        assert self.controller is not None
        servicer = AdminServicer(self.controller, self._addresses)
        self._admin_server, port = await start_grpc_server(
            lambda server: control_pb2_grpc.add_ControlPlaneServicer_to_server(servicer, server),
            control_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name,
            self.config.admin_host,
            self.config.admin_port,
        )
        host = ray.util.get_node_ip_address() if self.config.admin_host == "0.0.0.0" else self.config.admin_host
        return f"{host}:{port}"

    async def _start_routers(self) -> list[str]:
        me = ray.get_runtime_context().current_actor
        for i in range(self.config.num_routers):
            port = self.config.router_port + i if self.config.router_port else 0
            config = RouterConfig(
                host=self.config.router_host,
                port=port,
                policy=self.config.router_policy,
                admission=self.config.router_admission,
                max_failovers=self.config.router_max_failovers,
            )
            self._routers.append(RouterActor.options(name=f"raylane:router:{i}").remote(config, me))
        return list(await asyncio.gather(*(r.start.remote() for r in self._routers)))

    def _addresses(self) -> tuple[str, list[str], str]:
        info = self.info
        if info is None:
            return "", [], ""
        return info.admin_address, list(info.router_addresses), info.state_url

    async def _reconcile_forever(self) -> None:
        assert self.controller is not None
        while True:
            try:
                await asyncio.to_thread(self.controller.reconcile_once)
            except Exception:  # reconcile_once guards its steps; this guards the guard
                logger.exception("reconcile loop iteration failed")
            await asyncio.sleep(self.config.reconcile_interval_s)

    # ---- called by routers and the CLI --------------------------------------------------------

    async def routing_state(self) -> RoutingState:
        assert self.controller is not None, "start() first"
        return await asyncio.to_thread(self.controller.routing_state)

    async def bootstrap_tenant(self, tenant: str, api_key: str | None) -> str | None:
        """Make sure `tenant` exists and, when given, accepts `api_key` (e.g. from a Kubernetes Secret).

        Returns the key's id. Idempotent, so a restarted head pod can run it again.
        """
        assert self.controller is not None, "start() first"
        store = self.controller.store

        def run() -> str | None:
            if store.get_tenant(tenant) is None:
                store.create_tenant(TenantSpec(name=tenant))
            return None if api_key is None else store.add_key(tenant, api_key)

        return await asyncio.to_thread(run)

    async def save_learned(self, name: str, router_id: str, data: dict[str, Any]) -> None:
        """Keep what router `router_id` learned (e.g. its length predictor) in the state store."""
        assert self.controller is not None, "start() first"
        await asyncio.to_thread(save_learned, self.controller.store, name, router_id, data)

    async def load_learned(self, name: str) -> dict[str, Any] | None:
        """The freshest snapshot of `name` any router saved, for a router that is starting."""
        assert self.controller is not None, "start() first"
        return await asyncio.to_thread(load_learned, self.controller.store, name)

    async def cluster_info(self) -> ClusterInfo | None:
        return self.info

    async def reconcile_now(self) -> None:
        assert self.controller is not None, "start() first"
        await asyncio.to_thread(self.controller.reconcile_once)

    async def shutdown(self) -> None:
        """Stop everything the control plane started; desired state stays in Redis for the next `up`."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        for router in self._routers:
            try:
                await router.stop.remote()
            except Exception:
                logger.warning("router did not stop cleanly", exc_info=True)
            ray.kill(router)
        self._routers = []
        if self.controller is not None:
            await asyncio.to_thread(self.controller.shutdown)
        if self._admin_server is not None:
            await self._admin_server.stop(grace=1.0)
        if self._redis is not None:
            await asyncio.to_thread(self._redis.shutdown)
        logger.info("control plane shut down")


def get_control_plane() -> Any:
    """The running control plane's handle (Ray must be initialised in namespace `raylane`)."""
    return ray.get_actor(CONTROL_PLANE_ACTOR, namespace=NAMESPACE)

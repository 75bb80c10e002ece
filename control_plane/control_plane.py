"""The `ControlPlane` actor: state store, admin gRPC service, router replicas and the reconcile loop.

It is a named, detached actor (`raylane-control-plane` in namespace `raylane`), so it outlives the
`raylane up` process; the CLI talks to it over gRPC, routers over Ray. Ray restarts it when its process
dies, and it starts itself again: it re-adopts the routers and workers (detached actors, which kept
serving meanwhile) instead of starting new ones, and listens on the same admin port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import ray

from control_plane import metrics as control_plane_metrics_module
from control_plane.admin import AdminServicer, add_admin_servicer
from control_plane.admin_auth import AdminAuthInterceptor, admin_token_for
from control_plane.adoption import answers, find_actor, kill_and_release, load_admin_port, save_admin_address
from control_plane.config import ControlPlaneConfig
from control_plane.controller import Controller
from control_plane.learned_state import load_learned, save_learned
from control_plane.metrics import process_metrics as control_plane_metrics
from control_plane.redis_server import EmbeddedRedis, connect, stop_orphan
from control_plane.spec import TenantSpec
from protos.raylane.v1 import control_pb2
from router.auth_limit import AuthFailureLimiter, auth_limit_metrics
from router.grpc_server import start_grpc_server
from router.http.ports import HTTP_FREE_PORT, HTTP_OFF
from router.metrics import MetricsServer, serve_metrics
from router.server import CONTROL_PLANE_ACTOR, NAMESPACE, RouterActor, RoutingState

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class ClusterInfo:
    """Where a running cluster can be reached."""

    admin_address: str
    router_addresses: tuple[str, ...]
    state_url: str
    router_http_addresses: tuple[str, ...] = ()
    """The routers' OpenAI-compatible HTTP fronts (`host:port`); empty when `router.http_port` turns them off."""
    metrics_address: str = ""
    """The control plane's Prometheus `/metrics` (`host:port`); empty when `metrics_port` turns it off."""
    router_metrics_addresses: tuple[str, ...] = ()
    """The routers' own `/metrics` ports (`host:port`); empty when `router.metrics_port` turns them off."""


def router_name(index: int) -> str:
    """The Ray actor name of router replica `index`, in namespace `raylane`."""
    return f"raylane:router:{index}"


# Restarts without limit: the data plane keeps serving meanwhile, and each life re-adopts it.
@ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=-1)
class ControlPlane:
    """Owns the cluster's desired state and makes the actors follow it. Call `start` once (a restart calls it)."""

    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self._redis: EmbeddedRedis | None = None
        self.controller: Controller | None = None
        self._admin_server: grpc.aio.Server | None = None
        self._routers: list[Any] = []
        self._loop_task: asyncio.Task | None = None
        self._supervisor_task: asyncio.Task | None = None
        self._router_task: asyncio.Task | None = None
        self._metrics_server: MetricsServer | None = None
        self._start_lock = asyncio.Lock()
        self.info: ClusterInfo | None = None
        self._init_restart()

    def _init_restart(self) -> None:
        context = ray.get_runtime_context()
        self._is_restart = context.was_current_actor_reconstructed
        if self._is_restart:
            logger.warning("control plane restarted pid=%d; starting again and re-adopting the data plane", os.getpid())
            # Nobody else calls `start` on a restarted actor, so it calls itself, from a thread that can wait.
            threading.Thread(
                target=self._start_until_started, args=(context.current_actor,), name="raylane-restart", daemon=True
            ).start()

    def _start_until_started(self, me: Any) -> None:
        while self.info is None:
            try:
                ray.get(me.start.remote())
                return
            except ray.exceptions.ActorUnavailableError:
                # Until Ray has marked this life alive, a call to itself is refused as "restarting".
                time.sleep(0.2)
            except Exception:
                logger.exception("control plane restart failed; trying again")
                time.sleep(self.config.reconcile_interval_s)

    async def start(self) -> ClusterInfo:
        # A restart's own call and `raylane up` may both call it; the second waits and gets the same answer.
        async with self._start_lock:
            return await self._start()

    async def _start(self) -> ClusterInfo:
        if self.info is not None:
            return self.info
        self.config.state_path.mkdir(parents=True, exist_ok=True)
        store, self._redis = await asyncio.to_thread(connect, self.config.redis_url, self.config.state_path)
        controller = Controller(
            store, rebalance_interval_s=self.config.rebalance_interval_s, metrics=control_plane_metrics()
        )
        state_url = self.config.redis_url or (self._redis.url if self._redis else "")
        # Converge once before serving (adopting running workers), so routers never see an empty pool.
        await asyncio.to_thread(controller.reconcile_once)
        self.controller = controller
        admin_address = await self._start_admin(await asyncio.to_thread(load_admin_port, store))
        await asyncio.to_thread(save_admin_address, store, admin_address)
        metrics_address = self._start_metrics()
        router_addresses = await self._start_routers()
        described = await asyncio.gather(*(router.describe.remote() for router in self._routers))
        self.info = ClusterInfo(
            admin_address=admin_address,
            router_addresses=tuple(router_addresses),
            state_url=state_url,
            router_http_addresses=tuple(d["http_address"] for d in described if d["http_address"]),
            metrics_address=metrics_address,
            router_metrics_addresses=tuple(d["metrics_address"] for d in described if d["metrics_address"]),
        )
        self._loop_task = asyncio.create_task(self._reconcile_forever())
        self._router_task = asyncio.create_task(self._supervise_routers_forever())
        if self._redis is not None:
            self._supervisor_task = asyncio.create_task(self._supervise_redis_forever(self._redis))
        store.append_event("control_plane_started", admin=admin_address)
        logger.info("control plane started admin=%s routers=%s state=%s", admin_address, router_addresses, state_url)
        return self.info

    def _start_metrics(self) -> str:
        """Serve this process's metrics on `metrics_port`; returns `host:port`, empty when off or the port is taken."""
        if self.config.metrics_port == HTTP_OFF:
            return ""
        self._metrics_server = serve_metrics(
            # Through the module: Ray pickles this actor class by value, and a registry (it holds a lock) cannot be.
            control_plane_metrics_module.REGISTRY,
            self.config.admin_host,
            0 if self.config.metrics_port == HTTP_FREE_PORT else self.config.metrics_port,
            what="control_plane",
        )
        if self._metrics_server is None:
            return ""
        host = ray.util.get_node_ip_address() if self.config.admin_host == "0.0.0.0" else self.config.admin_host
        return f"{host}:{self._metrics_server.port}"

    async def _start_admin(self, previous_port: int) -> str:
        """Serve admin on the configured port, or (port 0) on the one a previous life picked, if it is free."""
        assert self.controller is not None
        servicer = AdminServicer(self.controller, self._addresses)
        # Checked before the servicer runs, so no admin call (nor its Redis work) happens unauthenticated.
        auth = AdminAuthInterceptor(
            await asyncio.to_thread(admin_token_for, self.config),
            limiter=AuthFailureLimiter(
                self.config.auth_limit,
                metrics=auth_limit_metrics(control_plane_metrics_module.REGISTRY),
                surface="admin",
            ),
            audit=servicer.audit,
        )
        ports = [self.config.admin_port] if self.config.admin_port or not previous_port else [previous_port, 0]
        for i, port in enumerate(ports):
            try:
                self._admin_server, port = await start_grpc_server(
                    lambda server: add_admin_servicer(servicer, server),
                    control_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name,
                    self.config.admin_host,
                    port,
                    tls_cert_file=self.config.tls_cert_file,
                    tls_key_file=self.config.tls_key_file,
                    interceptors=[auth],
                )
                break
            except (OSError, RuntimeError):  # grpc reports a taken port either way, by version
                if i == len(ports) - 1:
                    raise
                logger.warning("admin port %d is taken; picking a free one (the cluster file is stale)", port)
        host = ray.util.get_node_ip_address() if self.config.admin_host == "0.0.0.0" else self.config.admin_host
        return f"{host}:{port}"

    async def _start_routers(self) -> list[str]:
        """After a restart, adopt the router replicas that still run; start the others.

        On a first start, a leftover replica is replaced: it holds a handle to a control plane that is gone.
        """
        started = await asyncio.gather(*(self._router(i) for i in range(self.config.num_routers)))
        self._routers = [router for router, _ in started]  # in replica order, as the addresses are
        return [address for _, address in started]

    async def _router(self, index: int, ports: tuple[int, int, int] | None = None) -> tuple[Any, str]:
        """Replica `index`'s handle and gRPC address; `ports` (gRPC, HTTP, metrics) override the configured ones:
        a replacement takes its predecessor's, so every address clients and scrapers hold stays good."""
        name = router_name(index)
        router = await asyncio.to_thread(find_actor, name) if self._is_restart else None
        address = None if router is None else await asyncio.to_thread(answers, router)
        if address:
            logger.info("router adopted name=%s address=%s", name, address)
            return router, address
        await asyncio.to_thread(kill_and_release, name)  # dead or hung: its name is needed for the new one
        config = self.config.router_config(index)
        if ports:
            config = dataclasses.replace(config, port=ports[0], http_port=ports[1], metrics_port=ports[2])
        # Detached: a router serves on from its cached table while the control plane restarts.
        router = RouterActor.options(name=name, namespace=NAMESPACE, lifetime="detached").remote(
            config, ray.get_runtime_context().current_actor
        )
        try:
            return router, await router.start.remote()
        except Exception:
            ray.kill(router)  # detached: nothing else would ever stop it
            raise

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

    async def _supervise_routers_forever(self) -> None:
        """Start a dead router replica again on its old port, so the addresses clients hold stay good; never dies."""
        while True:
            await asyncio.sleep(self.config.reconcile_interval_s)
            for index, router in enumerate(self._routers):
                try:
                    await asyncio.wait_for(router.ping.remote(), timeout=30)
                except ray.exceptions.ActorDiedError:
                    await self._replace_router(index)
                except Exception:  # slow, unreachable or restarting is not dead: a loaded replica must stay
                    logger.info("router did not answer a ping index=%d", index, exc_info=True)

    async def _replace_router(self, index: int) -> None:
        assert self.info is not None
        ports = (
            _port_of(self.info.router_addresses, index),
            _port_of(self.info.router_http_addresses, index, off=HTTP_OFF),
            _port_of(self.info.router_metrics_addresses, index, off=HTTP_OFF),
        )
        try:
            self._routers[index], address = await self._router(index, ports=ports)
        except Exception:  # e.g. the port is not free yet: the next pass tries again
            logger.exception("router replacement failed index=%d ports=%s", index, ports)
            return
        logger.warning("router replaced name=%s address=%s", router_name(index), address)

    async def _supervise_redis_forever(self, embedded: EmbeddedRedis) -> None:
        """Restart the embedded Redis from its AOF whenever its process died; never dies itself."""
        while True:
            await asyncio.sleep(self.config.redis_check_interval_s)
            try:
                if await asyncio.to_thread(embedded.restart_if_dead):
                    logger.warning("embedded redis restarted pid=%d url=%s", embedded.pid, embedded.url)
            except Exception:  # e.g. the restart itself failed: try again next tick
                logger.exception("embedded redis supervision step failed")

    # ---- called by routers and the CLI --------------------------------------------------------

    async def pid(self) -> int:
        """The control plane's process id (for operators and failure tests)."""
        return os.getpid()

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
        for task in (self._loop_task, self._supervisor_task, self._router_task):
            if task is not None:
                task.cancel()  # the supervisor first of all: it would restart the Redis we stop below
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
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self._redis is not None:
            await asyncio.to_thread(self._redis.shutdown)
        elif not self.config.redis_url:
            # Shut down before this life attached to it: the Redis a previous life started still runs.
            await asyncio.to_thread(stop_orphan, self.config.state_path)
        logger.info("control plane shut down")


def get_control_plane() -> Any:
    """The running control plane's handle (Ray must be initialised in namespace `raylane`)."""
    return ray.get_actor(CONTROL_PLANE_ACTOR, namespace=NAMESPACE)


def _port_of(addresses: tuple[str, ...], index: int, off: int = 0) -> int:
    """The port of `addresses[index]` (`host:port`); `off` when that listener is off (no address)."""
    address = addresses[index] if index < len(addresses) else ""
    return int(address.rsplit(":", 1)[1]) if address else off

"""The router replica: a `grpc.aio` server inside a Ray actor, fed by the control plane.

It refreshes the routing table (tenants, key hashes, deployments, adapter owners, workers) from
the control plane every `table_refresh_s`, and every worker's load every `stats_refresh_s`
(100 ms by default), so placement never reads stats older than that plus one RPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import ray

from router.admission import AdmissionConfig, AdmissionController
from router.core import RouterCore
from router.dispatch import WorkerClient
from router.errors import InvalidArgument, Unavailable
from router.length_predictor import LengthPredictor
from router.policy import ClusterView, WorkerView
from router.registry import DEFAULT_POLICY, make_policy
from router.servicer import RouterServicer, start_router_server
from router.table import RoutingTable
from workers.messages import GenerateCall, PrefillResult, TokenChunk, WorkerStats

logger = logging.getLogger(__name__)

CONTROL_PLANE_ACTOR = "raylane-control-plane"
NAMESPACE = "raylane"


@dataclass(kw_only=True, frozen=True)
class RouterConfig:
    """One router replica."""

    host: str = "127.0.0.1"
    """Interface the gRPC server binds; `0.0.0.0` inside Kubernetes."""
    port: int = 0
    """Port to bind; 0 picks a free one (the bound address is returned by `start`)."""
    table_refresh_s: float = 0.5
    """How often the routing table is pulled from the control plane."""
    stats_refresh_s: float = 0.1
    """How often every worker's load is pulled; placement reads stats at most this old."""
    stats_timeout_s: float = 2.0
    """A worker whose stats call takes longer is treated as unhealthy until it answers again."""
    policy: str = DEFAULT_POLICY
    """Routing policy by name (router/registry.py); `raylane` is the full length- and KV-aware one."""
    admission: bool = False
    """Predictive admission: queue a request rather than place it where its KV forecast would overflow."""
    admission_headroom: float = 0.95
    """Share of a worker's KV pool admission may plan to fill (above 1 overcommits, betting on early finishes)."""

    def __post_init__(self) -> None:
        make_policy(self.policy)  # a typo fails here, at startup, with the list of names
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.table_refresh_s <= 0 or self.stats_refresh_s <= 0 or self.stats_timeout_s <= 0:
            raise ValueError("refresh intervals and timeouts must be positive")


@dataclass(kw_only=True, frozen=True)
class WorkerEntry:
    """A worker as the control plane announces it to routers."""

    worker_id: str
    deployment: str
    role: str
    handle: Any
    """The worker's Ray actor handle."""


@dataclass(kw_only=True, frozen=True)
class RoutingState:
    """What a router pulls from the control plane."""

    table: RoutingTable
    workers: Mapping[str, WorkerEntry] = field(default_factory=dict)
    models: Mapping[str, str] = field(default_factory=dict)
    """Deployment -> model folder (for token counting)."""


class RayWorkerClient:
    """`WorkerClient` over a worker actor: Ray streaming generators, cancelled when the consumer leaves."""

    def __init__(self, worker_id: str, handle: Any) -> None:
        self.worker_id = worker_id
        self.handle = handle

    async def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        async with _cancel_unless_done(self.handle.generate.remote(call)) as stream:
            async for chunk in stream:
                yield chunk

    async def prefill(self, call: GenerateCall) -> tuple[PrefillResult, Any]:
        first_ref, kv_ref = self.handle.prefill.remote(call)
        return await first_ref, kv_ref

    async def decode(self, kv: Any, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        async with _cancel_unless_done(self.handle.decode.remote(kv, call)) as stream:
            async for chunk in stream:
                yield chunk

    async def stats(self) -> WorkerStats:
        return await self.handle.stats.remote()


@asynccontextmanager
async def _cancel_unless_done(generator: Any):
    state = {"done": False}

    async def chunks() -> AsyncIterator[TokenChunk]:
        async for ref in generator:
            chunk = await ref
            yield chunk
            if chunk.finished:
                state["done"] = True

    try:
        yield chunks()
    finally:
        if not state["done"]:
            # The worker's generator sees the cancel, aborts the request and frees its blocks.
            ray.cancel(generator)


class RayDirectory:
    """The router's live knowledge of the cluster, refreshed in the background."""

    def __init__(self, config: RouterConfig, control_plane: Any) -> None:
        self.config = config
        self.control_plane = control_plane
        self._state = RoutingState(table=RoutingTable())
        self._clients: dict[str, RayWorkerClient] = {}
        self._stats: dict[str, tuple[float, WorkerStats]] = {}
        self._tasks: list[asyncio.Task] = []

    def table(self) -> RoutingTable:
        return self._state.table

    def clients(self) -> Mapping[str, WorkerClient]:
        return self._clients

    def view(self) -> ClusterView:
        now = time.monotonic()
        workers: dict[str, list[WorkerView]] = {}
        for entry in self._state.workers.values():
            seen, stats = self._stats.get(entry.worker_id, (0.0, None))
            fresh = stats is not None and now - seen <= self.config.stats_timeout_s
            load = {}
            if stats is not None:
                load = dict(
                    num_running=stats.num_running,
                    num_waiting=stats.num_waiting,
                    kv_usage=stats.kv_usage,
                    kv_blocks_total=stats.kv_blocks_total,
                    kv_blocks_used=stats.kv_blocks_used,
                    kv_bytes_per_block=stats.kv_bytes_per_block,
                    kv_block_size=stats.kv_block_size,
                    output_tokens_per_s=stats.output_tokens_per_s,
                    adapters=frozenset(stats.adapters),
                )
            view = WorkerView(
                worker_id=entry.worker_id, deployment=entry.deployment, role=entry.role, is_healthy=fresh, **load
            )
            workers.setdefault(entry.deployment, []).append(view)
        return ClusterView(workers=workers)

    def model_path(self, deployment: str) -> str | None:
        return self._state.models.get(deployment)

    async def start(self) -> None:
        await self.refresh_table()
        await self.refresh_stats()
        self._tasks = [
            asyncio.create_task(self._every(self.config.table_refresh_s, self.refresh_table)),
            asyncio.create_task(self._every(self.config.stats_refresh_s, self.refresh_stats)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def refresh_table(self) -> None:
        state: RoutingState = await self.control_plane.routing_state.remote()
        self._state = state
        clients = {}
        for wid, entry in state.workers.items():
            client = self._clients.get(wid)
            # A replaced worker keeps its id but is a new actor: compare handles, not ids.
            clients[wid] = (
                client if client is not None and client.handle == entry.handle else RayWorkerClient(wid, entry.handle)
            )
        self._clients = clients

    async def refresh_stats(self) -> None:
        async def one(client: RayWorkerClient) -> None:
            try:
                stats = await asyncio.wait_for(client.stats(), self.config.stats_timeout_s)
            except Exception:
                return  # stale stats mark it unhealthy in `view`
            self._stats[client.worker_id] = (time.monotonic(), stats)

        await asyncio.gather(*(one(c) for c in list(self._clients.values())))
        for gone in set(self._stats) - set(self._clients):
            del self._stats[gone]

    @staticmethod
    async def _every(interval_s: float, fn) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await fn()
            except Exception:
                logger.exception("router refresh failed step=%s", fn.__name__)


class _TokenCounter:
    """CountTokens: the deployment's own tokenizer, loaded once per model folder."""

    def __init__(self, directory: RayDirectory) -> None:
        self.directory = directory
        self._tokenizers: dict[str, Any] = {}

    async def __call__(self, deployment: str, text: str) -> int:
        path = self.directory.model_path(deployment)
        if path is None:
            raise InvalidArgument(f"unknown deployment {deployment!r}")
        tokenizer = self._tokenizers.get(path)
        if tokenizer is None:
            from workers.engine.tokenizer import Tokenizer

            try:
                tokenizer = await asyncio.to_thread(Tokenizer.from_pretrained, path)
            except (OSError, ValueError) as exc:
                raise Unavailable(f"cannot load the tokenizer of {deployment!r}: {exc}") from None
            self._tokenizers[path] = tokenizer
        return len(tokenizer.encode(text))


class RouterReplica:
    """A router's moving parts: the directory that feeds it, its request path and its gRPC server.

    Runs on any asyncio loop of a process connected to Ray: inside `RouterActor`, or in the
    foreground of `raylane router serve` (a router pod of the Helm chart).
    """

    def __init__(self, config: RouterConfig, control_plane: Any) -> None:
        self.config = config
        self.directory = RayDirectory(config, control_plane)
        # Learns output lengths from this replica's completed requests (persistence: next step of issue 5).
        self.core = RouterCore(
            self.directory,
            policy=make_policy(config.policy),
            predictor=LengthPredictor(),
            admission=AdmissionController(AdmissionConfig(headroom=config.admission_headroom))
            if config.admission
            else None,
        )
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        """Pull the routing state, then serve; returns the address clients should use."""
        await self.directory.start()
        servicer = RouterServicer(self.core, count_tokens=_TokenCounter(self.directory))
        self._server, port = await start_router_server(servicer, self.config.host, self.config.port)
        host = ray.util.get_node_ip_address() if self.config.host == "0.0.0.0" else self.config.host
        self.address = f"{host}:{port}"
        logger.info("router started address=%s", self.address)
        return self.address

    async def wait(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.directory.stop()
        if self._server is not None:
            await self._server.stop(grace=grace_s)


@ray.remote(num_cpus=0, max_concurrency=10_000)
class RouterActor:
    """One router replica the control plane starts. Call `start` once; it returns the address."""

    def __init__(self, config: RouterConfig, control_plane: Any) -> None:
        self.replica = RouterReplica(config, control_plane)

    async def start(self) -> str:
        return await self.replica.start()

    async def ping(self) -> str:
        return self.replica.address

    async def stop(self) -> None:
        await self.replica.stop()

"""The router replica: a `grpc.aio` server inside a Ray actor, fed by the control plane.

It refreshes the routing table (tenants, key hashes, deployments, adapter owners, workers) from
the control plane every `table_refresh_s`, and every worker's load every `stats_refresh_s`
(100 ms by default), so placement never reads stats older than that plus one RPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import ray

from router.admission import AdmissionController
from router.auth_limit import AuthFailureLimiter, auth_limit_metrics
from router.config import RouterConfig
from router.core import RouterCore
from router.dispatch import WorkerClient
from router.errors import InvalidArgument, Unavailable, WorkerLost
from router.http.app import build_app
from router.http.ports import HTTP_FREE_PORT, HTTP_OFF
from router.http.server import HttpServer
from router.length_predictor import LengthPredictor
from router.metrics import REGISTRY, MetricsServer, process_metrics, serve_metrics
from router.policy import ClusterView, WorkerView
from router.servicer import RouterServicer, start_router_server
from router.table import RoutingTable
from workers.engine.errors import EngineDeadError
from workers.messages import GenerateCall, PrefillResult, TokenChunk, WorkerStats

logger = logging.getLogger(__name__)

CONTROL_PLANE_ACTOR = "raylane-control-plane"
NAMESPACE = "raylane"


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


_LOST_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, EngineDeadError)
"""The actor died or cannot be reached, or its engine loop died (the actor still answers, but serves nothing):
the router fails the request over."""


class RayWorkerClient:
    """`WorkerClient` over a worker actor: Ray streaming generators, cancelled when the consumer leaves.

    Ray's actor-died errors become `WorkerLost`, which dispatch answers with a failover.
    """

    def __init__(self, worker_id: str, handle: Any) -> None:
        self.worker_id = worker_id
        self.handle = handle

    def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        return self._stream(lambda: self.handle.generate.remote(call))

    async def prefill(self, call: GenerateCall) -> tuple[PrefillResult, Any]:
        first_ref, kv_ref = self.handle.prefill.remote(call)
        try:
            return await first_ref, kv_ref
        except _LOST_ERRORS as exc:
            raise self._lost(exc) from None

    def decode(self, kv: Any, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        return self._stream(lambda: self.handle.decode.remote(kv, call))

    def attach(self, request_id: str, from_seq: int) -> AsyncIterator[TokenChunk]:
        return self._stream(lambda: self.handle.attach.remote(request_id, from_seq))

    async def stats(self) -> WorkerStats:
        return await self.handle.stats.remote()

    async def _stream(self, start: Callable[[], Any]) -> AsyncIterator[TokenChunk]:
        """The one generator over a Ray streaming call: starts it on the first `anext`, turns an actor's death
        into `WorkerLost`, and cancels the call when the consumer leaves before its last chunk."""
        generator = start()
        is_done = False
        try:
            async for ref in generator:
                chunk = await ref
                # A migrated stream ends right after this chunk: nothing is left to cancel.
                is_done = chunk.finished or bool(chunk.migrated_to)
                yield chunk
        except _LOST_ERRORS as exc:
            is_done = True  # nothing to cancel on a dead actor
            raise self._lost(exc) from None
        finally:
            if not is_done:
                # The worker's generator sees the cancel, aborts the request and frees its blocks.
                ray.cancel(generator)

    def _lost(self, exc: BaseException) -> WorkerLost:
        return WorkerLost(self.worker_id, f"worker {self.worker_id} died or is unreachable ({type(exc).__name__})")


async def _every(interval_s: float, fn: Callable[[], Awaitable[None]]) -> None:
    """Run `fn` every `interval_s` seconds until cancelled; a failure is logged, never fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await fn()
        except Exception:
            logger.exception("router periodic step failed step=%s", fn.__name__)


class RayDirectory:
    """The router's live knowledge of the cluster, refreshed in the background."""

    def __init__(self, config: RouterConfig, control_plane: Any) -> None:
        self.config = config
        self.control_plane = control_plane
        self._state = RoutingState(table=RoutingTable())
        self._clients: dict[str, RayWorkerClient] = {}
        self._stats: dict[str, tuple[float, WorkerStats]] = {}
        self._prefix: dict[str, frozenset[int]] = {}
        """Worker id -> its prefix summary as a set, built once per report rather than once per request."""
        self._suspect: dict[str, float] = {}
        """Worker id -> when a request lost it; stats sent before then do not make it healthy again."""
        self._tasks: list[asyncio.Task] = []
        self._tokenizers: dict[str, Any] = {}
        """Model path -> its tokenizer, or None where this process cannot load it (routing then uses text only)."""
        self._tokenizer_loads: dict[str, asyncio.Task] = {}
        self._num_refreshes_started = 0
        self._applied_refresh = 0
        """The newest refresh whose answer is applied: an older one answering later must not undo it."""
        self._init_view()

    def _init_view(self) -> None:
        # The view is kept, not rebuilt per request: a worker's `WorkerView` is rebuilt when its stats arrive or
        # its health changes, and the `ClusterView` around them only after such a change.
        self._worker_views: dict[str, WorkerView] = {}
        self._members: dict[str, tuple[str, str]] = {}
        """Worker id -> (deployment, role) of the table the views were built from, in table order."""
        self._cluster: ClusterView | None = None
        """None: a worker's view changed since the last `view()`."""
        self._next_stale_s = float("inf")
        """The earliest moment a worker placed on as fresh goes stale (`stats_stale_limit_s`)."""

    def table(self) -> RoutingTable:
        return self._state.table

    def clients(self) -> Mapping[str, WorkerClient]:
        return self._clients

    def mark_unhealthy(self, worker_id: str) -> None:
        """Stop placing on `worker_id` (e.g. it died mid-stream) until its stats answer again."""
        self._stats.pop(worker_id, None)
        self._suspect[worker_id] = time.monotonic()
        self._refresh_worker(worker_id, time.monotonic())

    def view(self) -> ClusterView:
        """Every worker of the table with its last stats; the same object until a worker's view changes."""
        now = time.monotonic()
        if now > self._next_stale_s:
            self._expire_stale(now)
        if self._cluster is None:
            workers: dict[str, list[WorkerView]] = {}
            for worker_id, (deployment, _) in self._members.items():
                workers.setdefault(deployment, []).append(self._worker_views[worker_id])
            self._cluster = ClusterView(workers=workers)
        return self._cluster

    def _update_worker(self, view: WorkerView) -> None:
        """The one place a worker's view changes (per-pool indexes hook in here); the next `view()` regroups."""
        self._worker_views[view.worker_id] = view
        self._cluster = None

    def _refresh_views(self) -> None:
        """After a table refresh: rebuild every view when the workers or their roles changed, else keep them."""
        members = {e.worker_id: (e.deployment, e.role) for e in self._state.workers.values()}
        if members == self._members:
            return
        self._members = members
        self._worker_views = {}
        self._cluster = None
        now = time.monotonic()
        for worker_id in members:
            self._refresh_worker(worker_id, now)

    def _expire_stale(self, now: float) -> None:
        """Take workers whose stats went stale out of placement; O(workers), once per deadline passed."""
        self._next_stale_s = float("inf")
        limit = self.config.stats_stale_limit_s
        for worker_id in self._members:
            seen, stats = self._stats.get(worker_id, (0.0, None))
            if stats is not None and now - seen <= limit:
                self._next_stale_s = min(self._next_stale_s, seen + limit)
            elif self._worker_views[worker_id].is_healthy:
                self._refresh_worker(worker_id, now)

    def _refresh_worker(self, worker_id: str, now: float) -> None:
        """Rebuild one worker's view from its table entry and its last stats."""
        member = self._members.get(worker_id)
        if member is None:
            return  # not in the table this view was built from; the next table refresh brings it
        deployment, role = member
        seen, stats = self._stats.get(worker_id, (0.0, None))
        # Stale stats still place (a loaded machine answers late); a failed stats call removed them already.
        fresh = stats is not None and now - seen <= self.config.stats_stale_limit_s
        if fresh:
            self._next_stale_s = min(self._next_stale_s, seen + self.config.stats_stale_limit_s)
        previous = self._worker_views.get(worker_id)
        if previous is not None and stats is None and not previous.is_healthy:
            return  # already out of placement with no load: nothing changed
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
                resident_adapters=None if stats.resident_adapters is None else frozenset(stats.resident_adapters),
                num_adapter_slots=stats.num_adapter_slots,
                num_pending_prefill_tokens=stats.num_pending_prefill_tokens,
                prefix_block_hashes=self._prefix.get(worker_id),
            )
        self._update_worker(WorkerView(worker_id=worker_id, deployment=deployment, role=role, is_healthy=fresh, **load))

    def latest_stats(self) -> list[WorkerStats]:
        """The last stats of every worker that answered (safe to call from a metrics server's thread)."""
        return [stats for _, stats in list(self._stats.values())]

    def model_path(self, deployment: str) -> str | None:
        return self._state.models.get(deployment)

    async def start(self) -> None:
        await self.refresh_table()
        await self.refresh_stats()
        self._tasks = [
            asyncio.create_task(_every(self.config.table_refresh_s, self.refresh_table)),
            asyncio.create_task(_every(self.config.stats_refresh_s, self.refresh_stats)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def refresh_table(self) -> None:
        self._num_refreshes_started += 1
        ticket = self._num_refreshes_started
        state: RoutingState = await self.control_plane.routing_state.remote()
        if ticket < self._applied_refresh:
            # A periodic refresh sent before a forced one (a key issued a moment ago) came back after it.
            return
        self._applied_refresh = ticket
        self._state = state
        clients = {}
        for wid, entry in state.workers.items():
            client = self._clients.get(wid)
            # A replaced worker keeps its id but is a new actor: compare handles, not ids.
            clients[wid] = (
                client if client is not None and client.handle == entry.handle else RayWorkerClient(wid, entry.handle)
            )
        # In place: a request's dispatch holds this mapping, and must see workers started after it began
        # (a migration destination); its own clients keep their handles either way.
        self._clients.clear()
        self._clients.update(clients)
        self._refresh_views()
        for path in set(state.models.values()) - set(self._tokenizers) - set(self._tokenizer_loads):
            self._tokenizer_loads[path] = asyncio.create_task(self._load_tokenizer(path))

    async def _load_tokenizer(self, path: str) -> Any:
        from workers.engine.tokenizer import Tokenizer

        try:
            tokenizer = await asyncio.to_thread(Tokenizer.from_pretrained, path)
        except (OSError, ValueError) as exc:
            # E.g. a router pod without the model folder: prefix affinity then covers token-id prompts only.
            logger.warning("tokenizer not loadable here path=%s error=%s", path, exc)
            tokenizer = None
        self._tokenizers[path] = tokenizer
        self._tokenizer_loads.pop(path, None)
        return tokenizer

    async def tokenizer(self, deployment: str) -> Any:
        """The deployment's tokenizer, loading it if needed; `Unavailable` when this process cannot load it."""
        path = self.model_path(deployment)
        if path is None:
            raise InvalidArgument(f"unknown deployment {deployment!r}")
        if path in self._tokenizers:
            tokenizer = self._tokenizers[path]
        else:
            loading = self._tokenizer_loads.get(path)
            tokenizer = await (loading if loading is not None else self._load_tokenizer(path))
        if tokenizer is None:
            raise Unavailable(f"cannot load the tokenizer of {deployment!r} on this router")
        return tokenizer

    def tokenize(self, deployment: str, text: str) -> tuple[int, ...] | None:
        """The prompt's token ids when the deployment's tokenizer is loaded here, else None (never blocks)."""
        path = self.model_path(deployment)
        tokenizer = None if path is None else self._tokenizers.get(path)
        return None if tokenizer is None else tuple(tokenizer.encode(text))

    async def refresh_stats(self) -> None:
        async def one(client: RayWorkerClient) -> None:
            asked = time.monotonic()
            try:
                stats = await asyncio.wait_for(client.stats(), self.config.stats_timeout_s)
            except TimeoutError:
                return  # slow, not dead: it keeps its last-known load until `stats_stale_limit_s`
            except Exception as exc:
                # An answer that is an error: the actor died, or its engine loop did. Out of placement at once.
                if client.worker_id in self._stats:
                    logger.warning("worker unplaceable worker_id=%s error=%s", client.worker_id, type(exc).__name__)
                self.mark_unhealthy(client.worker_id)
                return
            if self._suspect.get(client.worker_id, -1.0) >= asked:
                return  # an answer from before the worker was lost proves nothing
            self._suspect.pop(client.worker_id, None)
            self._stats[client.worker_id] = (time.monotonic(), stats)
            if stats.prefix_block_hashes is None:
                self._prefix.pop(client.worker_id, None)
            else:
                self._prefix[client.worker_id] = frozenset(stats.prefix_block_hashes)
            self._refresh_worker(client.worker_id, time.monotonic())

        await asyncio.gather(*(one(c) for c in list(self._clients.values())))
        for gone in set(self._stats) - set(self._clients):
            del self._stats[gone]
            self._prefix.pop(gone, None)


class _TokenCounter:
    """CountTokens: the deployment's own tokenizer, loaded once per model folder."""

    def __init__(self, directory: RayDirectory) -> None:
        self.directory = directory

    async def __call__(self, deployment: str, text: str) -> int:
        return len((await self.directory.tokenizer(deployment)).encode(text))


PREDICTOR_STATE = "length_predictor"
"""Name of the length predictor's snapshot in the control plane's learned state."""


class RouterReplica:
    """A router's moving parts: the directory that feeds it, its request path and its gRPC server.

    Runs on any asyncio loop of a process connected to Ray: inside `RouterActor`, or in the
    foreground of `raylane router serve` (a router pod of the Helm chart).
    """

    def __init__(self, config: RouterConfig, control_plane: Any) -> None:
        self.config = config
        self.directory = RayDirectory(config, control_plane)
        # Learns output lengths from completed requests; saved to and restored from the state store.
        # Every part from the one config tree (router/config.py).
        self.core = RouterCore(
            self.directory,
            policy=config.make_policy(),
            predictor=LengthPredictor(config.predictor),
            admission=AdmissionController(config.admission) if config.admission.enabled else None,
            failover=config.failover,
            tiers=config.tiers,
            metrics=process_metrics(),
        )
        # Worker metrics come from the stats this router pulls anyway, read at scrape time.
        self.core.metrics.watch_workers(self.directory.latest_stats)
        # One per replica, shared by its gRPC and HTTP ports: a lockout on one holds on the other.
        self.auth_limit = AuthFailureLimiter(config.auth_limit, metrics=auth_limit_metrics(REGISTRY), surface="router")
        self._server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._metrics_server: MetricsServer | None = None
        self._save_task: asyncio.Task | None = None
        self.address = ""
        self.http_address = ""
        """`host:port` of the OpenAI-compatible HTTP front; empty when `http_port` turns it off."""
        self.metrics_address = ""
        """`host:port` of the `/metrics` endpoint on `metrics_port`; empty when it is off (or its port was taken)."""

    async def start(self) -> str:
        """Pull the routing state, then serve; returns the address clients should use."""
        await self.directory.start()
        await self._load_predictor()
        servicer = RouterServicer(self.core, count_tokens=_TokenCounter(self.directory), auth_limit=self.auth_limit)
        self._server, port = await start_router_server(servicer, self.config)
        host = ray.util.get_node_ip_address() if self.config.host == "0.0.0.0" else self.config.host
        self.address = f"{host}:{port}"
        if self.config.http_port != HTTP_OFF:
            self.http_address = f"{host}:{await self._start_http()}"
        if self.config.metrics_port != HTTP_OFF:
            port = 0 if self.config.metrics_port == HTTP_FREE_PORT else self.config.metrics_port
            self._metrics_server = serve_metrics(REGISTRY, self.config.host, port, what="router")
            self.metrics_address = f"{host}:{self._metrics_server.port}" if self._metrics_server else ""
        self._save_task = asyncio.create_task(_every(self.config.predictor_save_s, self.save_predictor))
        logger.info(
            "router started address=%s http=%s metrics=%s",
            self.address,
            self.http_address or "off",
            self.metrics_address or "off",
        )
        return self.address

    async def _start_http(self) -> int:
        """Serve the OpenAI-compatible API on this loop, over the same `RouterCore` as gRPC; returns the port."""
        port = 0 if self.config.http_port == HTTP_FREE_PORT else self.config.http_port
        self._http = HttpServer(
            build_app(self.core, self.directory, limits=self.config.http_limits, auth_limit=self.auth_limit),
            host=self.config.host,
            port=port,
            limits=self.config.http_limits,
            ssl_certfile=self.config.tls_cert_file,
            ssl_keyfile=self.config.tls_key_file,
        )
        return await self._http.start()

    async def _load_predictor(self) -> None:
        try:
            data = await self.directory.control_plane.load_learned.remote(PREDICTOR_STATE)
            if data is not None:
                self.core.predictor = LengthPredictor.from_dict(data)
        except Exception as exc:  # a bad snapshot must not keep the router down: start from the prior
            logger.warning("length predictor not restored, starting from the prior: %r", exc)
            return
        keys = 0 if data is None else self.core.predictor.num_keys
        logger.info("length predictor restored=%s keys=%d", data is not None, keys)

    async def save_predictor(self) -> None:
        """Save the length predictor under this router's address (replicas never overwrite one another)."""
        if self.core.predictor is not None and self.address:
            await self.directory.control_plane.save_learned.remote(
                PREDICTOR_STATE, self.address, self.core.predictor.to_dict()
            )

    async def wait(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._save_task is not None:
            self._save_task.cancel()
        try:
            await self.save_predictor()
        except Exception:
            logger.exception("length predictor not saved at stop")
        await self.directory.stop()
        if self._http is not None:
            await self._http.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
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

    async def http_address(self) -> str:
        """`host:port` of the replica's OpenAI-compatible HTTP front; empty when it is off."""
        return self.replica.http_address

    async def describe(self) -> dict[str, Any]:
        """What this replica runs and has learned, for status pages and tests."""
        predictor = self.replica.core.predictor
        return {
            "address": self.replica.address,
            "http_address": self.replica.http_address,
            "metrics_address": self.replica.metrics_address,
            "policy": self.replica.core.policy.name,
            "predictor_keys": 0 if predictor is None else predictor.num_keys,
        }

    async def stop(self) -> None:
        await self.replica.stop()

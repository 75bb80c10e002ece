"""Real servers for the fuzz tests: one router (gRPC and HTTP over one `RouterCore`) on an in-process tiny-Llama
engine, and one admin server over a real Redis (no Ray)."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from control_plane.admin import AdminServicer, add_admin_servicer
from control_plane.admin_auth import AdminAuthInterceptor
from control_plane.controller import Controller
from control_plane.state import StateStore
from protos.raylane.v1 import control_pb2, router_pb2
from router.core import RouterCore
from router.grpc_server import start_grpc_server
from router.http.app import build_app
from router.http.server import HttpServer
from router.policy import ClusterView, WorkerView
from router.quota import QuotaLimits, QuotaTracker
from router.server import RouterConfig
from router.servicer import RouterServicer, start_router_server
from router.table import DeploymentRoute, RoutingTable, hash_api_key
from tests.router.inprocess_workers import EngineWorkerClient
from workers.engine.async_engine import AsyncEngine
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.engine.tokenizer import Tokenizer

CALL_TIMEOUT_S = 60.0
"""Every call has a deadline: one that runs past it is a hang, and fails the test."""
CONTEXT = 512
"""The tiny Llama's `max_position_embeddings`."""
KEYS = {"acme": "key-acme", "globex": "key-globex"}
ADMIN_TOKEN = "fuzz-admin-token"
DEPLOYMENT = "chat"
ADAPTER = "globex-legal"
"""A LoRA adapter of `globex`: `acme` naming it must be refused, not served."""


class ErrorLog(logging.Handler):
    """Collects ERROR records: the router logs one for every exception it masks as `internal router error`."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        """The messages (with their exception's text) logged since the last call."""
        taken, self.records = self.records, []
        return [f"{r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else r.getMessage() for r in taken]


@dataclass
class FuzzDirectory:
    """One deployment, `chat`, on one in-process engine; serves the model's tokenizer too."""

    routing_table: RoutingTable
    cluster: ClusterView
    worker_clients: Mapping[str, Any]
    model: Path
    tokenizers: dict[str, Tokenizer] = field(default_factory=dict)

    def table(self) -> RoutingTable:
        return self.routing_table

    def view(self) -> ClusterView:
        return self.cluster

    def clients(self) -> Mapping[str, Any]:
        return self.worker_clients

    async def tokenizer(self, deployment: str) -> Tokenizer:
        if deployment not in self.tokenizers:
            self.tokenizers[deployment] = Tokenizer.from_pretrained(self.model)
        return self.tokenizers[deployment]


@dataclass
class RouterStack:
    """A running router: `grpc_address` and `http_url` over one `RouterCore` and one engine."""

    grpc_address: str
    http_url: str
    engine: AsyncEngine
    errors: ErrorLog

    def kv_blocks_used(self) -> int:
        return self.engine.call(lambda e: e.stats().num_kv_blocks_used).result(timeout=CALL_TIMEOUT_S)


class _LoopThread:
    """An asyncio loop on a daemon thread, for servers the (synchronous) tests call over loopback."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=CALL_TIMEOUT_S)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="session")
def router_stack(tiny_llama, tiny_loras) -> Iterator[RouterStack]:
    config = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=4 * MiB, max_loras=1)
    engine = AsyncEngine(Engine(config))
    engine.call(lambda e: e.add_lora(ADAPTER, str(tiny_loras["a"]))).result(timeout=CALL_TIMEOUT_S)
    generous = QuotaLimits(max_concurrent=64, tokens_per_minute=10**12)
    directory = FuzzDirectory(
        routing_table=RoutingTable(
            version=1,
            deployments={DEPLOYMENT: DeploymentRoute(name=DEPLOYMENT, max_model_len=CONTEXT)},
            tenants=dict.fromkeys(KEYS, generous),
            key_hashes={hash_api_key(key): tenant for tenant, key in KEYS.items()},
            adapter_owners={(DEPLOYMENT, ADAPTER): "globex"},
        ),
        cluster=ClusterView(workers={DEPLOYMENT: [WorkerView(worker_id="w-0", deployment=DEPLOYMENT, role="mixed")]}),
        worker_clients={"w-0": EngineWorkerClient("w-0", engine)},
        model=tiny_llama,
    )
    errors = ErrorLog()
    logging.getLogger("router").addHandler(errors)
    loop = _LoopThread("fuzz-router")
    core = RouterCore(directory, quotas=QuotaTracker())

    async def count_tokens(deployment: str, text: str) -> int:
        return len((await directory.tokenizer(deployment)).encode(text))

    async def start() -> tuple[grpc.aio.Server, int, HttpServer, int]:
        servicer = RouterServicer(core, count_tokens=count_tokens)
        server, grpc_port = await start_router_server(servicer, RouterConfig(host="127.0.0.1", port=0))
        http = HttpServer(build_app(core, directory), host="127.0.0.1", port=0)
        return server, grpc_port, http, await http.start()

    server, grpc_port, http, http_port = loop.run(start())
    yield RouterStack(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", engine, errors)
    loop.run(http.stop())
    loop.run(server.stop(None))
    loop.close()
    logging.getLogger("router").removeHandler(errors)
    engine.shutdown()


@dataclass
class AdminStack:
    """A running admin server (auth on) over a real Redis, with no Ray: nothing reconciles what it writes."""

    address: str
    store: StateStore
    errors: ErrorLog


@pytest.fixture(scope="session")
def admin_stack(redis_server_url) -> Iterator[AdminStack]:
    client = redis.Redis.from_url(redis_server_url, decode_responses=True)
    store = StateStore(client, prefix=f"fuzz{uuid.uuid4().hex}:")
    errors = ErrorLog()
    logging.getLogger("control_plane").addHandler(errors)
    loop = _LoopThread("fuzz-admin")
    servicer = AdminServicer(Controller(store), lambda: ("admin", [], redis_server_url))
    service = control_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name
    server, port = loop.run(
        start_grpc_server(
            lambda server: add_admin_servicer(servicer, server),
            service,
            "127.0.0.1",
            0,
            interceptors=[AdminAuthInterceptor(ADMIN_TOKEN)],
        )
    )
    yield AdminStack(f"127.0.0.1:{port}", store, errors)
    loop.run(server.stop(None))
    loop.close()
    logging.getLogger("control_plane").removeHandler(errors)
    for key in client.scan_iter(f"{store.prefix}*"):
        client.delete(key)
    client.close()


ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"]
ADMIN_SERVICE = control_pb2.DESCRIPTOR.services_by_name["ControlPlane"]

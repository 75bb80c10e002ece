"""Starting a `grpc.aio` server the way every raylane service does: health checking and reflection on."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


async def start_grpc_server(
    register: Callable[[grpc.aio.Server], None], service_name: str, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """Start a server with `register(server)`'s services plus health and reflection; returns it and its port.

    Health reports SERVING for "" and `service_name` (the full name, e.g. `raylane.v1.Router`).
    """
    server = grpc.aio.server()
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {service_name} to {host}:{port}")
    await server.start()
    for name in ("", service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound

"""Starting a `grpc.aio` server the way every raylane service does: health checking and reflection on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


def check_tls_files(cert_file: str | None, key_file: str | None) -> None:
    """Both TLS files or neither: half a TLS setting would silently serve plaintext. (Files are read where the
    server starts, which may be another machine.)"""
    if bool(cert_file) != bool(key_file):
        raise ValueError(f"tls_cert_file and tls_key_file go together, got cert={cert_file!r} key={key_file!r}")


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """TLS credentials from PEM files (the certificate may carry its chain)."""
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])


async def start_grpc_server(
    register: Callable[[grpc.aio.Server], None],
    service_name: str,
    host: str,
    port: int,
    *,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int]:
    """Start a server with `register(server)`'s services plus health and reflection; returns it and its port.

    Health reports SERVING for "" and `service_name` (the full name, e.g. `raylane.v1.Router`). With both TLS
    files the port speaks only TLS; `interceptors` see every call, health and reflection included.
    """
    server = grpc.aio.server(interceptors=tuple(interceptors))
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls_cert_file and tls_key_file:
        bound = server.add_secure_port(f"{host}:{port}", server_credentials(tls_cert_file, tls_key_file))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {service_name} to {host}:{port}")
    await server.start()
    for name in ("", service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound

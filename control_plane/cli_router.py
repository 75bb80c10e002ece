"""`raylane router serve`: a router in the foreground of its own process (the Helm chart's router pods)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)
router_app = typer.Typer(help="Run routers outside the control plane.", no_args_is_help=True)


@router_app.command("serve")
def serve(
    address: Annotated[str, typer.Option(help="Ray address to join: `auto` (this node's) or host:port.")] = "auto",
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 in a pod.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="gRPC port (the CLI's and the chart's default is 50051).")] = 50051,
    http_port: Annotated[
        int, typer.Option(help="OpenAI-compatible HTTP port (/v1/completions, /v1/chat/completions); 0 turns it off.")
    ] = 8000,
    metrics_port: Annotated[
        int,
        typer.Option(
            help="Prometheus /metrics port of its own (the HTTP port serves /metrics too); 0 turns it off, -1 picks "
            "a free one."
        ),
    ] = 9091,
    wait_for_ray: Annotated[float, typer.Option(help="Seconds to wait for Ray and the control plane.")] = 0,
    grace: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish on SIGTERM.")] = 10.0,
    policy: Annotated[str, typer.Option(help="Routing policy (router/registry.py); `raylane` is the full one.")] = (
        "least_loaded"
    ),
    admission: Annotated[
        bool, typer.Option("--admission/--no-admission", help="Queue requests whose KV forecast would overflow.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every routing decision.")] = False,
    tls_cert: Annotated[str | None, typer.Option(help="PEM certificate: the gRPC and HTTP ports speak TLS.")] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
) -> None:
    """Serve the Router gRPC API from this process until SIGTERM/SIGINT, fed by the cluster's control plane.

    The process must be able to reach a Ray node (in a pod: run `ray start --address=HEAD:6379 --num-cpus=0`
    first). Health checking reports SERVING once the first routing table has arrived.
    """
    from control_plane.cluster import ClusterNotRunningError, connect_ray, wait_for_control_plane
    from router.server import RouterConfig, RouterReplica

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    try:
        config = RouterConfig(
            host=host,
            port=port,
            http_port=http_port,
            metrics_port=metrics_port,
            policy=policy,
            admission=admission,
            tls_cert_file=tls_cert,
            tls_key_file=tls_key,
        )
        connect_ray(address, wait_s=wait_for_ray)
        control_plane = wait_for_control_plane(wait_for_ray)
    except (ValueError, ConnectionError, ClusterNotRunningError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    asyncio.run(_serve(RouterReplica(config, control_plane), grace))


async def _serve(replica, grace_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    address = await replica.start()
    scheme = "https" if replica.config.tls_cert_file else "http"
    http = f"{scheme}://{replica.http_address}/v1" if replica.http_address else "off"
    metrics = f"http://{replica.metrics_address}/metrics" if replica.metrics_address else "off"
    console.print(f"[green]router serving[/green] {address} (OpenAI-compatible HTTP: {http}; metrics: {metrics})")
    await stop.wait()
    console.print("stopping: letting in-flight requests finish")
    await replica.stop(grace_s=grace_s)

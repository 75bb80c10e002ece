"""`raylane router serve`: a router in the foreground of its own process (the Helm chart's router pods)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from router.config import RouterConfig

console = Console(stderr=True)
router_app = typer.Typer(help="Run routers outside the control plane.", no_args_is_help=True)


@router_app.command("serve")
def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            help="Router YAML (RouterConfig keys, router/config.py), or a cluster YAML whose `router:` section is read "
            "(the Helm chart's ConfigMap). The options below override it; without either, RouterConfig's defaults."
        ),
    ] = None,
    address: Annotated[str, typer.Option(help="Ray address to join: `auto` (this node's) or host:port.")] = "auto",
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1); 0.0.0.0 in a pod.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (default 50051).")] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            help="OpenAI-compatible HTTP port (/v1/completions, /v1/chat/completions; default 8000); 0 turns it off."
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Prometheus /metrics port of its own (default 9091; the HTTP port serves /metrics too); 0 turns it "
            "off, -1 picks a free one."
        ),
    ] = None,
    wait_for_ray: Annotated[float, typer.Option(help="Seconds to wait for Ray and the control plane.")] = 0,
    grace: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish on SIGTERM.")] = 10.0,
    policy: Annotated[
        str | None,
        typer.Option(help="Routing policy (router/registry.py; default: the config's, else `raylane`, the full one)."),
    ] = None,
    admission: Annotated[
        bool | None,
        typer.Option("--admission/--no-admission", help="Queue requests whose KV forecast would overflow."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every routing decision.")] = False,
    tls_cert: Annotated[str | None, typer.Option(help="PEM certificate: the gRPC and HTTP ports speak TLS.")] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved router config as YAML and exit (Ray is not joined).")
    ] = False,
) -> None:
    """Serve the Router gRPC API from this process until SIGTERM/SIGINT, fed by the cluster's control plane.

    The process must be able to reach a Ray node (in a pod: run `ray start --address=HEAD:6379 --num-cpus=0`
    first). Health checking reports SERVING once the first routing table has arrived.
    """
    from control_plane.cluster import ClusterNotRunningError, connect_ray, wait_for_control_plane
    from router.server import RouterReplica

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    flags = {
        "host": host,
        "port": port,
        "http_port": http_port,
        "metrics_port": metrics_port,
        "policy": policy,
        "tls_cert_file": tls_cert,
        "tls_key_file": tls_key,
    }
    try:
        resolved = resolve_config(config, flags, admission)
        if dry_run:
            import yaml

            typer.echo(yaml.safe_dump(resolved.to_dict(), sort_keys=False), nl=False)
            return
        connect_ray(address, wait_s=wait_for_ray)
        control_plane = wait_for_control_plane(wait_for_ray)
    except (ValueError, OSError, ConnectionError, ClusterNotRunningError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    asyncio.run(_serve(RouterReplica(resolved, control_plane), grace))


def resolve_config(file: Path | None, flags: dict[str, Any], admission: bool | None) -> RouterConfig:
    """The file's router config (or the defaults), with every flag that was given on top."""
    from router import config_tree
    from router.config import RouterConfig

    base = RouterConfig.from_yaml_file(file) if file is not None else RouterConfig()
    data = config_tree.deep_merge(base.to_dict(), {k: v for k, v in flags.items() if v is not None})
    if admission is not None:
        data = config_tree.deep_merge(data, {"admission": {"enabled": admission}})
    return RouterConfig.from_dict(data, "")


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

"""`raylane migrate` and `raylane drain`: live request migration from the command line, over the admin API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from control_plane.cli_cluster import StateDir, _cluster, _fail, console, out
from control_plane.config import DEFAULT_STATE_DIR
from router.client import RaylaneError

_SLACK_S = 30.0
"""Extra seconds the CLI waits on the admin call beyond the work's own time limit."""


def _admin(state_dir: Path, timeout_s: float):
    from control_plane.admin_client import connect_admin

    address = _cluster(state_dir).admin_address
    try:
        return connect_admin(address, state_dir, timeout_s=timeout_s)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None


def _describe(result) -> str:
    if result.outcome == "committed":
        return (
            f"[green]committed[/green] {result.request_id}: {result.source_id} -> {result.destination_id} "
            f"({result.num_stages} stages, {result.num_blocks_copied} blocks, {result.bytes_moved} bytes, "
            f"downtime {result.downtime_ms:.1f} ms, total {result.total_ms:.1f} ms)"
        )
    return (
        f"[yellow]aborted[/yellow] {result.request_id}: stays on {result.source_id} "
        f"(to {result.destination_id or '-'}: {result.reason or 'no reason given'})"
    )


def migrate(
    request_id: Annotated[
        str, typer.Argument(help="The request id as routers name it: TENANT/ID (the id the client sent, or got back).")
    ],
    to: Annotated[
        str, typer.Option("--to", help="Destination worker id (see `raylane status`); empty picks the least loaded.")
    ] = "",
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
) -> None:
    """Move one running request to another worker live: its KV cache is copied in stages while it keeps
    decoding, then it pauses briefly and continues on the destination. The client's stream follows it.

    Exit status 0 when the migration committed, 3 when it aborted (the request keeps running where it was).
    """
    try:
        with _admin(state_dir, 120.0 + _SLACK_S) as admin:
            result = admin.migrate(request_id, to)
    except RaylaneError as exc:
        raise _fail(exc) from None
    out.print(_describe(result))
    if result.outcome != "committed":
        raise typer.Exit(3)


def drain(
    worker_id: Annotated[str, typer.Argument(help="Worker id to drain (see `raylane status`).")],
    scale_down: Annotated[
        bool,
        typer.Option(
            "--scale-down/--replace",
            help="--scale-down also lowers the pool's desired replicas by one; --replace (default) lets the pool "
            "start a fresh worker in its place.",
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to keep moving requests before stopping the worker anyway (routers then fail "
            "the rest over by recompute)."
        ),
    ] = 120.0,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
) -> None:
    """Drain a worker: routers stop sending it new requests, every running request moves live to the least-loaded
    other worker of its pool, then the worker is stopped.

    Use it before maintenance or a scale-down. Exit status 0 when nothing was left on the worker, 3 otherwise.
    """
    if timeout <= 0:
        raise _fail(ValueError(f"--timeout must be positive, got {timeout}"))
    with console.status(f"draining {worker_id}"):
        try:
            with _admin(state_dir, timeout + _SLACK_S) as admin:
                response = admin.drain(worker_id, scale_down=scale_down, timeout_s=timeout)
        except RaylaneError as exc:
            raise _fail(exc) from None
    for result in response.migrations:
        out.print(_describe(result))
    committed = sum(m.outcome == "committed" for m in response.migrations)
    out.print(
        f"drained {worker_id}: {committed} request(s) moved, {response.num_remaining} left when it stopped"
        + (" (pool scaled down)" if scale_down else " (the pool starts a replacement)")
    )
    if response.num_remaining:
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    """Add `migrate` and `drain` to the `raylane` app."""
    for fn in (migrate, drain):
        app.command()(fn)

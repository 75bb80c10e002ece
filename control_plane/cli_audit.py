"""`raylane audit`: the admin audit log (who changed what, when, and what was refused), over the admin API."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from control_plane.cli_cluster import StateDir, _admin, _fail, out
from control_plane.config import DEFAULT_STATE_DIR
from router.client import RaylaneError


def audit(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Show the newest N entries.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of a table.")] = False,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
) -> None:
    """Show the admin audit log, oldest first: every mutating admin call (deploy, tenants, keys, adapters,
    migrate, drain) and every refused one, with the caller's address and the outcome."""
    try:
        with _admin(state_dir) as admin:
            events = admin.audit_events(limit)
    except RaylaneError as exc:
        raise _fail(exc) from None
    if as_json:
        for e in events:
            record = {"ts": e.ts, "action": e.action, "peer": e.peer, "principal": e.principal, "outcome": e.outcome}
            out.print(json.dumps({**record, **dict(e.details)}, sort_keys=True), highlight=False, soft_wrap=True)
        return
    table = Table("time (UTC)", "action", "peer", "principal", "outcome", "details")
    for e in events:
        when = datetime.datetime.fromtimestamp(e.ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        details = " ".join(f"{k}={v}" for k, v in sorted(e.details.items()))
        table.add_row(when, e.action, e.peer, e.principal, e.outcome, details)
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add `raylane audit` to the `raylane` app."""
    app.command()(audit)

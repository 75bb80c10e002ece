"""The admin audit log: who called which mutating admin RPC, on what, when, and how it ended; refusals too.

Each entry goes to the state store's `audit` list (bounded; `raylane audit` reads it back) and to the log as one
line. A store that is down loses the stored copy, never the call: the log line still says what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis

from control_plane.state import StateStore

logger = logging.getLogger(__name__)

ADMIN_PRINCIPAL = "admin-token"
"""The principal of every authenticated admin call: the admin token is the one credential the API accepts."""

AUDITED_CALLS: dict[str, Callable[[Any, Any], dict[str, str]]] = {
    "ApplyDeployment": lambda req, resp: (
        {"deployment": req.spec.name} | ({"version": str(resp.version)} if resp else {})
    ),
    "DeleteDeployment": lambda req, resp: {"deployment": req.name},
    "CreateTenant": lambda req, resp: {"tenant": req.tenant.name},
    "DeleteTenant": lambda req, resp: {"tenant": req.name},
    "IssueApiKey": lambda req, resp: {"tenant": req.tenant} | ({"key_id": resp.key_id} if resp else {}),
    "RevokeApiKey": lambda req, resp: {"key_id": req.key_id},
    "RegisterAdapter": lambda req, resp: {
        "adapter": req.adapter.name,
        "tenant": req.adapter.tenant,
        "deployment": req.adapter.deployment,
    },
    "Migrate": lambda req, resp: {"request_id": req.request_id, "destination": req.destination_worker_id},
    "Drain": lambda req, resp: {"worker_id": req.worker_id, "scale_down": str(req.scale_down).lower()},
}
"""The mutating admin RPCs, each with what its request (and, once it succeeded, its response) names."""


class AuditLog:
    """Writes audit entries; blocking (Redis), so async callers run `record` in a thread."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def record(self, action: str, *, peer: str, principal: str, outcome: str, **details: str) -> None:
        """One entry: `action` (an RPC name, or `auth_lockout`), by `principal` from `peer`, ending in `outcome`."""
        text = " ".join(f"{k}={v}" for k, v in sorted(details.items()))
        logger.info("admin audit action=%s peer=%s principal=%s outcome=%s %s", action, peer, principal, outcome, text)
        try:
            self.store.append_audit(action, peer=peer, principal=principal, outcome=outcome, **details)
        except redis.RedisError as exc:
            logger.warning("admin audit entry not stored action=%s error=%r", action, exc)

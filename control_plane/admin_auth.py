"""The admin credential: where it comes from, and the server interceptor that demands it on every admin call.

A tenant's API key never passes: only the one admin token does. The token is compared by its SHA-256
digest in constant time, and never logged. Failed attempts count towards a per-address lockout and go to the
audit log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc

from control_plane.audit import ADMIN_PRINCIPAL, AuditLog
from control_plane.config import ControlPlaneConfig
from router.auth_limit import AuthFailureLimiter, peer_host

logger = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin-token"
"""The token's file in the state directory, created (mode 0600) at the control plane's first start."""
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Health checks (probes) and reflection stay open: they reveal no state and change nothing."""
_TOKEN_BYTES = 32


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_or_create_admin_token(state_path: Path, *, token: str | None = None, token_file: str | None = None) -> str:
    """The admin token: `token` if given, else `token_file`'s content, else `<state_path>/admin-token`
    (made at first use, mode 0600, and reused at every restart)."""
    if token:
        return token
    if token_file:
        text = Path(token_file).expanduser().read_text().strip()
        if not text:
            raise ValueError(f"admin_token_file {token_file} is empty; put the admin token in it")
        return text
    path = state_path / ADMIN_TOKEN_FILE
    try:
        # O_EXCL: of two processes starting at once, one writes and the other reads what it wrote.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_admin_token(path)
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    logger.info("admin token created path=%s mode=0600", path)
    return token


def admin_token_for(config: ControlPlaneConfig) -> str:
    """The admin token a control plane started with `config` demands (the same on its node and the CLI's)."""
    return load_or_create_admin_token(config.state_path, token=config.admin_token, token_file=config.admin_token_file)


def read_admin_token(path: Path) -> str:
    text = path.read_text().strip()
    if not text:
        raise ValueError(f"{path} is empty; delete it and restart the control plane to make a new admin token")
    return text


def redact_url(url: str) -> str:
    """`redis://:secret@host:6379/0` -> `redis://:***@host:6379/0`; URLs without a password unchanged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else None
    return None


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call but health and reflection that lacks `authorization: Bearer <token>`.

    With a `limiter`, an address that fails too often is refused (RESOURCE_EXHAUSTED, `retry-after-ms` trailer)
    whatever it sends until its lockout ends; with an `audit` log, every refusal is recorded (a locked-out address's
    wrong-token calls only in the log, so a flood cannot push real admin actions out of the stored log).
    """

    def __init__(self, token: str, *, limiter: AuthFailureLimiter | None = None, audit: AuditLog | None = None) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self._digest = token_digest(token)
        self.limiter = limiter
        self.audit = audit

    def is_authorized(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        credential = _bearer(metadata)
        # Digests have one length, so compare_digest's time does not depend on what the caller sent.
        return credential is not None and hmac.compare_digest(token_digest(credential), self._digest)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICE_PREFIXES):
            return await continuation(handler_call_details)
        if self.is_authorized(handler_call_details.invocation_metadata):
            handler = await continuation(handler_call_details)
            if handler is None or handler.unary_unary is None or self.limiter is None:
                return handler
            return handler._replace(unary_unary=self._guarded(method, handler.unary_unary))
        has_credential = _bearer(handler_call_details.invocation_metadata) is not None
        return self._refusal(method, "wrong-token" if has_credential else "none")

    def _guarded(self, method: str, behavior: Callable) -> Callable:
        """`behavior` behind the lockout: the right token does not lift a lockout its address earned."""

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            peer = peer_host(context.peer() or "")
            await self._refuse_if_locked(context, method, peer, ADMIN_PRINCIPAL)
            return await behavior(request, context)

        return guarded

    def _refusal(self, method: str, principal: str) -> grpc.RpcMethodHandler:
        reason = "wrong credential" if principal == "wrong-token" else "no admin credential"
        message = f"{reason}: admin calls need `authorization: Bearer <admin token>` (see <state_dir>/admin-token)"

        # Every admin RPC is unary-unary; an unknown method gets the same answer, revealing nothing.
        async def abort(request: bytes, context: grpc.aio.ServicerContext) -> None:
            peer = peer_host(context.peer() or "")
            await self._refuse_if_locked(context, method, peer, principal)
            is_lockout = self.limiter is not None and self.limiter.record_failure(peer)
            logger.warning(
                "admin call refused method=%s peer=%s status=UNAUTHENTICATED reason=%s", method, peer, reason
            )
            await self._record(_short(method), peer, principal, "UNAUTHENTICATED")
            if is_lockout:
                await self._record("auth_lockout", peer, principal, "RESOURCE_EXHAUSTED")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(abort)

    async def _refuse_if_locked(
        self, context: grpc.aio.ServicerContext, method: str, peer: str, principal: str
    ) -> None:
        retry_after_s = self.limiter.retry_after_s(peer) if self.limiter is not None else None
        if retry_after_s is None:
            return
        if principal == ADMIN_PRINCIPAL:  # the admin locked out is worth a stored entry; a guesser's flood is not
            await self._record(_short(method), peer, principal, "RESOURCE_EXHAUSTED")
        else:
            logger.debug("admin call refused method=%s peer=%s status=RESOURCE_EXHAUSTED", method, peer)
        context.set_trailing_metadata((("retry-after-ms", str(math.ceil(retry_after_s * 1000))),))
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many failed admin authentications from {peer}; retry in {retry_after_s:.0f} s",
        )

    async def _record(self, action: str, peer: str, principal: str, outcome: str) -> None:
        if self.audit is not None:
            await asyncio.to_thread(self.audit.record, action, peer=peer, principal=principal, outcome=outcome)


def _short(method: str) -> str:
    """`/raylane.v1.ControlPlane/IssueApiKey` -> `IssueApiKey`."""
    return method.rpartition("/")[2] or method

"""The admin credential: where it comes from, and the server interceptor that demands it on every admin call.

A tenant's API key never passes: only the one admin token does. The token is compared by its SHA-256
digest in constant time, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc

from control_plane.config import ControlPlaneConfig

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
    """Refuses (UNAUTHENTICATED) every call but health and reflection that lacks `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self._digest = token_digest(token)

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
        if method.startswith(OPEN_SERVICE_PREFIXES) or self.is_authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        has_credential = _bearer(handler_call_details.invocation_metadata) is not None
        reason = "wrong credential" if has_credential else "no admin credential"
        logger.warning("admin call refused method=%s status=UNAUTHENTICATED reason=%s", method, reason)
        return _refuse(reason)


def _refuse(reason: str) -> grpc.RpcMethodHandler:
    message = f"{reason}: admin calls need `authorization: Bearer <admin token>` (see <state_dir>/admin-token)"

    # Every admin RPC is unary-unary; an unknown method gets the same answer, revealing nothing.
    async def abort(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)

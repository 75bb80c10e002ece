"""What the HTTP front refuses before a handler runs: oversized bodies, slow clients and locked-out peers.

Two layers, because uvicorn calls the app only once a request's head is complete: `GuardedH11Protocol` closes
connections whose head does not arrive in time (slowloris), `EdgeGuard` (ASGI) reads the body under a size and
time limit and applies the failed-authentication lockout shared with the gRPC port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import h11
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from router.auth_limit import AuthFailureLimiter, lockout_error
from router.http.errors import error_body, error_response

logger = logging.getLogger(__name__)

MiB = 1 << 20
OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Paths that need no key, so the lockout does not apply: a probe sharing a locked-out address keeps working."""


@dataclass(kw_only=True, frozen=True)
class HttpLimits:
    """Bounds on what one HTTP request may cost the router before its handler runs."""

    max_body_bytes: int = 8 * MiB
    """Largest request body; a larger one (declared by Content-Length or counted while streaming) gets 413."""
    header_timeout_s: float = 10.0
    """A connection whose request head (line and headers) is not complete this long after it opened, or after the
    head's first byte on a kept-alive connection, is closed."""
    body_timeout_s: float = 30.0
    """A request body not fully received this long after its head gets 408 and the connection is closed."""
    max_header_bytes: int = 64 * 1024
    """Largest request head; h11 refuses a longer one with 400."""

    def __post_init__(self) -> None:
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}")
        if not self.header_timeout_s > 0 or not self.body_timeout_s > 0:
            raise ValueError(
                f"header_timeout_s and body_timeout_s must be positive, got {self.header_timeout_s!r} and "
                f"{self.body_timeout_s!r}"
            )
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be >= 1024, got {self.max_header_bytes!r}")


class _BodyRefused(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class EdgeGuard:
    """ASGI middleware: lockout check, then the whole body read under `HttpLimits`, then the app.

    Handlers read their whole body anyway (they validate JSON from bytes), so reading it here costs no memory beyond
    the limit, and lets an oversized or trickled body be refused before any handler work.
    """

    def __init__(self, app: ASGIApp, *, limits: HttpLimits, auth_limit: AuthFailureLimiter | None = None) -> None:
        self.app = app
        self.limits = limits
        self.auth_limit = auth_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        peer = (scope.get("client") or ("",))[0]
        if self.auth_limit is not None and scope.get("path") not in OPEN_PATHS:
            refusal = lockout_error(self.auth_limit, peer)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send)
                return
        try:
            body = await self._read_body(scope, receive)
        except _BodyRefused as exc:
            logger.info("http request refused status=%d peer=%s reason=%s", exc.status, peer, exc.message)
            await _closing_error(exc)(scope, receive, send)
            return
        if body is None:
            return  # the client left before its body was in
        await self.app(scope, _replay(body, receive), self._watch_auth(peer, send))

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.limits.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise _BodyRefused(413, f"request body is {declared} bytes; the limit is {limit}", "body_too_large")
        deadline = time.monotonic() + self.limits.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise _BodyRefused(
                    408, f"request body not received within {self.limits.body_timeout_s:g} s", "request_timeout"
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # chunked or understated: count what actually arrives
                raise _BodyRefused(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _watch_auth(self, peer: str, send: Send) -> Send:
        if self.auth_limit is None:
            return send
        limiter = self.auth_limit

        async def watched(message: Message) -> None:
            # Every failed authentication answers 401 (router/http/errors.py), whichever handler refused it.
            if message["type"] == "http.response.start" and message["status"] == 401:
                limiter.record_failure(peer)
            await send(message)

        return watched


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 has already refused a malformed one
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body in one message, then the connection's own messages (a disconnect, for streaming responses)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _closing_error(exc: _BodyRefused) -> Response:
    # Close: the rest of the body is still on the wire, and a trickling client should not keep its connection.
    body = error_body(exc.message, "invalid_request_error", code=exc.code)
    return Response(
        json.dumps(body), status_code=exc.status, headers={"connection": "close"}, media_type="application/json"
    )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on each request head: uvicorn has none, so a client that opens a
    connection and sends nothing, or its headers a byte at a time, would hold it forever."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # a head has begun (on a kept-alive connection too): it has until the deadline
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._header_timeout_s, self._on_head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            peer = self.client[0] if self.client else "?"
            logger.info(
                "http connection closed peer=%s reason=request head not complete within %gs",
                peer,
                self._header_timeout_s,
            )
            self.transport.close()

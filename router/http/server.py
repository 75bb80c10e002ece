"""Serving the OpenAI app with uvicorn on the router's own event loop, next to its gRPC server."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket

import uvicorn
from starlette.types import ASGIApp

from router.http.limits import GuardedH11Protocol, HttpLimits

logger = logging.getLogger(__name__)


class HttpServer:
    """A `uvicorn.Server` on an already-running loop; `start` binds, `stop` drains and closes.

    The socket is bound here rather than by uvicorn: a busy port raises `OSError` to the caller instead of
    uvicorn's `sys.exit`, and port 0 binds a free port whose number `start` returns. uvicorn's signal handlers
    are never installed: the process that runs the loop owns its signals. `limits` bounds each request head's size
    and arrival time (the app's `EdgeGuard` bounds its body).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str,
        port: int,
        grace_s: float = 10.0,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        limits = limits or HttpLimits()
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=int(grace_s) or 1,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            http=functools.partial(GuardedH11Protocol, header_timeout_s=limits.header_timeout_s),  # type: ignore[arg-type]
            h11_max_incomplete_event_size=limits.max_header_bytes,
        )
        self.server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._main: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        self._socket = _listen(self.config.host, self.config.port, self.config.backlog)
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[self._socket])
        self._main = asyncio.create_task(self.server.main_loop())
        return self._socket.getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace period), then close."""
        if self._main is None:
            return
        self.server.should_exit = True
        await self._main
        await self.server.shutdown(sockets=[self._socket] if self._socket else None)
        self._main = None


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket whose accepted connections get TCP_NODELAY.

    asyncio sets TCP_NODELAY only on sockets whose `proto` is IPPROTO_TCP, and `socket.create_server` leaves it 0:
    uvicorn writes a response's head and body separately, and with Nagle on, the body waits for the client's
    delayed ACK (40 ms on Linux).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock

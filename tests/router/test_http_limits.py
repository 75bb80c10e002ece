"""The HTTP front's edge limits on a real uvicorn server: oversized bodies get 413 before they are read, clients that
trickle their head or body are cut off within the bound, and normal requests keep being served meanwhile.

Raw sockets play the misbehaving clients (no HTTP library sends a lying Content-Length or stalls on purpose);
`httpx` plays the well-behaved ones.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from inprocess_workers import TableOnly

from router.core import RouterCore
from router.http.app import build_app
from router.http.limits import HttpLimits
from router.http.server import HttpServer
from router.quota import QuotaLimits
from router.table import DeploymentRoute, RoutingTable, hash_api_key

KEY = "rl-key-for-the-http-limit-tests"
LIMITS = HttpLimits(max_body_bytes=1024, header_timeout_s=1.0, body_timeout_s=1.0)
SLACK_S = 3.0
"""Allowed lateness of a cut-off on a loaded machine: the bound is the limit plus this."""


@dataclass
class Front:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    table = RoutingTable(
        version=1,
        deployments={"chat": DeploymentRoute(name="chat")},
        tenants={"acme": QuotaLimits(max_concurrent=4, tokens_per_minute=1_000_000)},
        key_hashes={hash_api_key(KEY): "acme"},
    )
    directory = TableOnly(table)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = HttpServer(
        build_app(RouterCore(directory), directory, limits=LIMITS), host="127.0.0.1", port=0, limits=LIMITS
    )
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    yield Front("127.0.0.1", port)
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _connect(front: Front) -> socket.socket:
    sock = socket.create_connection((front.host, front.port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start = time.monotonic()
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def _read_response(sock: socket.socket) -> bytes:
    """One whole response on a connection the server keeps open (head and body may come in separate segments)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


def _completion_body(model: str = "no-such-model") -> bytes:
    return json.dumps({"model": model, "prompt": "hi", "max_tokens": 2}).encode()


def _head(length_header: str) -> bytes:
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\n{length_header}\r\n\r\n"
    ).encode()


def test_a_normal_body_reaches_the_handler(front):
    response = httpx.post(f"{front.url}/v1/completions", content=_completion_body(), headers=_auth(), timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_a_declared_oversized_body_is_refused_before_it_is_sent(front):
    with _connect(front) as sock:
        sock.sendall(_head("Content-Length: 100000000"))  # 100 MB announced, nothing sent
        raw, elapsed = _read_until_closed(sock, timeout_s=10)
    status, body = _status_and_body(raw)
    assert status == 413 and elapsed < 5
    assert body["error"]["code"] == "body_too_large" and "limit is 1024" in body["error"]["message"]
    assert b"connection: close" in raw.lower()


def test_an_oversized_body_from_a_library_client_gets_413(front):
    response = httpx.post(f"{front.url}/v1/completions", content=b"x" * 2048, headers=_auth(), timeout=10)
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_chunked_body_is_counted_as_it_arrives(front):
    with _connect(front) as sock:
        sock.sendall(_head("Transfer-Encoding: chunked"))
        for _ in range(3):  # 3 x 512 bytes, never terminated: refused once it passes 1024
            sock.sendall(b"200\r\n" + b"x" * 512 + b"\r\n")
        raw, elapsed = _read_until_closed(sock, timeout_s=10)
    status, body = _status_and_body(raw)
    assert status == 413 and body["error"]["code"] == "body_too_large" and elapsed < 5


def test_a_chunked_body_under_the_limit_is_served(front):
    payload = _completion_body()
    with _connect(front) as sock:
        sock.sendall(
            _head("Transfer-Encoding: chunked") + f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
        )
        raw = _read_response(sock)
    status, body = _status_and_body(raw)
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_a_trickled_head_is_cut_off_while_others_are_served(front):
    served: list[int] = []
    done = threading.Event()

    def others() -> None:  # well-behaved clients, served throughout
        while not done.is_set():
            served.append(httpx.get(f"{front.url}/health", timeout=10).status_code)
            time.sleep(0.05)

    neighbour = threading.Thread(target=others, daemon=True)
    neighbour.start()
    closed_after = None
    try:
        with _connect(front) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            start = time.monotonic()
            sock.settimeout(0.2)
            while closed_after is None and time.monotonic() - start < LIMITS.header_timeout_s + SLACK_S + 5:
                try:
                    sock.sendall(b"X")  # one byte of a header name every 0.2 s: never a complete head
                    if sock.recv(1) == b"":
                        closed_after = time.monotonic() - start
                except TimeoutError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed_after = time.monotonic() - start
    finally:
        done.set()
        neighbour.join(15)
    assert closed_after is not None, "the server kept a trickling connection open"
    assert closed_after < LIMITS.header_timeout_s + SLACK_S
    assert served and set(served) == {200}  # the loop kept serving everyone else


def test_a_connection_that_sends_nothing_is_closed(front):
    with _connect(front) as sock:
        raw, elapsed = _read_until_closed(sock, timeout_s=10)
    assert raw == b"" and elapsed < LIMITS.header_timeout_s + SLACK_S


def test_a_stalled_body_gets_408_and_is_closed(front):
    with _connect(front) as sock:
        sock.sendall(_head("Content-Length: 100") + b'{"model": ')  # 10 of 100 bytes, then silence
        raw, elapsed = _read_until_closed(sock, timeout_s=10)
    status, body = _status_and_body(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert elapsed < LIMITS.body_timeout_s + SLACK_S


def test_a_kept_alive_connection_is_cut_off_when_its_next_head_trickles(front):
    with _connect(front) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request's head never completes
        raw, elapsed = _read_until_closed(sock, timeout_s=10)
    assert raw == b"" and elapsed < LIMITS.header_timeout_s + SLACK_S


@pytest.mark.parametrize(
    "fields",
    [{"max_body_bytes": 0}, {"header_timeout_s": 0}, {"body_timeout_s": -1}, {"max_header_bytes": 10}],
    ids=str,
)
def test_bad_limits_are_refused_with_a_message(fields):
    with pytest.raises(ValueError, match="must be"):
        HttpLimits(**fields)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

"""The failed-authentication lockout: the pure policy on an injected clock, then one limiter shared by a real gRPC
router port and a real HTTP front (uvicorn), driven by the project's client, `grpc` and `httpx` over loopback."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from inprocess_workers import TableOnly
from prometheus_client import CollectorRegistry

from router.auth_limit import AuthFailureLimiter, AuthLimitConfig, AuthLimitMetrics, peer_host
from router.client import AuthenticationError, Client, QuotaExceededError
from router.core import RouterCore
from router.http.app import build_app
from router.http.server import HttpServer
from router.quota import QuotaLimits
from router.server import RouterConfig
from router.servicer import RouterServicer, start_router_server
from router.table import DeploymentRoute, RoutingTable, hash_api_key

GOOD_KEY = "rl-good-key-for-the-lockout-tests"
PEER = "10.0.0.7"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: FakeClock, **config: Any) -> AuthFailureLimiter:
    return AuthFailureLimiter(AuthLimitConfig(**config), clock=clock)


# ---- the policy ---------------------------------------------------------------------------------


def test_the_nth_failure_in_the_window_locks_the_peer_out_for_the_window():
    clock = FakeClock()
    limits = limiter(clock, max_failures=3, window_s=60)
    assert [limits.record_failure(PEER) for _ in range(3)] == [False, False, True]
    assert limits.retry_after_s(PEER) == pytest.approx(60)
    clock.now += 45
    assert limits.retry_after_s(PEER) == pytest.approx(15)
    clock.now += 15.001
    assert limits.retry_after_s(PEER) is None
    # The slate is clean afterwards: it takes another full run of failures to lock it again.
    assert [limits.record_failure(PEER) for _ in range(3)] == [False, False, True]


def test_failures_spread_wider_than_the_window_never_lock():
    clock = FakeClock()
    limits = limiter(clock, max_failures=3, window_s=60)
    for _ in range(10):
        assert not limits.record_failure(PEER)
        clock.now += 31  # at most two failures within any 60 s
    assert limits.retry_after_s(PEER) is None


def test_peers_are_counted_apart():
    clock = FakeClock()
    limits = limiter(clock, max_failures=2, window_s=60)
    limits.record_failure("10.0.0.1")
    limits.record_failure("10.0.0.2")
    assert limits.retry_after_s("10.0.0.1") is None and limits.retry_after_s("10.0.0.2") is None
    limits.record_failure("10.0.0.1")
    assert limits.retry_after_s("10.0.0.1") is not None and limits.retry_after_s("10.0.0.2") is None


def test_memory_is_bounded_by_an_lru_of_peers():
    clock = FakeClock()
    limits = limiter(clock, max_failures=2, window_s=60, max_peers=3)
    for i in range(1000):
        limits.record_failure(f"10.1.{i // 256}.{i % 256}")
    assert limits.num_peers == 3
    # A peer failing over and over keeps only its last `max_failures` times.
    for _ in range(10_000):
        limits.record_failure("10.9.9.9")
    assert limits.num_peers == 3 and len(limits._peers["10.9.9.9"].failures) <= 2


def test_zero_max_failures_turns_the_limit_off():
    clock = FakeClock()
    limits = limiter(clock, max_failures=0)
    assert not any(limits.record_failure(PEER) for _ in range(100))
    assert limits.retry_after_s(PEER) is None


@pytest.mark.parametrize(
    "config", [{"max_failures": -1}, {"max_failures": True}, {"window_s": 0}, {"max_peers": 0}], ids=str
)
def test_bad_config_is_refused_with_a_message(config):
    with pytest.raises(ValueError, match="must be"):
        AuthLimitConfig(**config)


def test_router_config_carries_the_limits_and_validates_them():
    config = RouterConfig.from_dict({"auth_limit": {"max_failures": 5, "window_s": 30}})
    assert config.auth_limit == AuthLimitConfig(max_failures=5, window_s=30)
    with pytest.raises(ValueError, match=r"router\.auth_limit\.window_s: window_s must be positive"):
        RouterConfig.from_dict({"auth_limit": {"window_s": -1}})


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:5678", "127.0.0.1"),
        ("ipv6:[::1]:5678", "::1"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_peer_host_drops_the_port(peer, host):
    assert peer_host(peer) == host


def test_lockouts_are_counted_and_logged_once(caplog):
    clock = FakeClock()
    registry = CollectorRegistry()
    limits = AuthFailureLimiter(
        AuthLimitConfig(max_failures=2, window_s=60), metrics=AuthLimitMetrics(registry), clock=clock
    )
    with caplog.at_level(logging.INFO, logger="router.auth_limit"):
        for _ in range(5):
            limits.record_failure(PEER)
    assert registry.get_sample_value("raylane_auth_failures_total") == 5
    assert registry.get_sample_value("raylane_auth_lockouts_total") == 1
    assert [r.getMessage() for r in caplog.records if "auth lockout" in r.getMessage()] == [
        f"auth lockout surface=router peer={PEER} failures=2 window_s=60 locked_s=60"
    ]


# ---- one limiter behind a real gRPC port and a real HTTP front ------------------------------------


@dataclass
class Front:
    grpc_address: str
    http_url: str
    clock: FakeClock
    limiter: AuthFailureLimiter
    registry: CollectorRegistry


async def _count_words(deployment: str, text: str) -> int:
    return len(text.split())


@pytest.fixture
def front() -> Iterator[Front]:
    table = RoutingTable(
        version=1,
        deployments={"chat": DeploymentRoute(name="chat")},
        tenants={"acme": QuotaLimits(max_concurrent=4, tokens_per_minute=1_000_000)},
        key_hashes={hash_api_key(GOOD_KEY): "acme"},
    )
    directory = TableOnly(table)
    clock = FakeClock()
    registry = CollectorRegistry()
    shared = AuthFailureLimiter(
        AuthLimitConfig(max_failures=3, window_s=60), metrics=AuthLimitMetrics(registry), clock=clock
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[Any, int, HttpServer, int]:
        core = RouterCore(directory)
        server, port = await start_router_server(
            RouterServicer(core, count_tokens=_count_words, auth_limit=shared), RouterConfig(host="127.0.0.1", port=0)
        )
        http = HttpServer(build_app(core, directory, auth_limit=shared), host="127.0.0.1", port=0)
        return server, port, http, await http.start()

    server, port, http, http_port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield Front(f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", clock, shared, registry)
    asyncio.run_coroutine_threadsafe(http.stop(), loop).result(30)
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _models(front: Front, key: str) -> httpx.Response:
    return httpx.get(f"{front.http_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_failures_over_grpc_and_http_add_up_and_lock_out_even_a_valid_key(front):
    with Client(front.grpc_address, "rl-wrong-key", timeout_s=10) as wrong:
        with pytest.raises(AuthenticationError):
            wrong.complete("chat", "hi")
        with pytest.raises(AuthenticationError):
            wrong.count_tokens("chat", "hi")
    assert _models(front, "rl-wrong-key").status_code == 401  # the third failure, over the other port
    with Client(front.grpc_address, GOOD_KEY, timeout_s=10) as good, pytest.raises(QuotaExceededError) as refused:
        good.count_tokens("chat", "two words")
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.retry_after_s == pytest.approx(60, abs=1)
    response = _models(front, GOOD_KEY)
    assert response.status_code == 429 and response.headers["Retry-After"] == "60"
    assert response.json()["error"]["type"] == "rate_limit_error"
    with Client(front.grpc_address, GOOD_KEY, timeout_s=10) as good, pytest.raises(QuotaExceededError):
        list(good.generate("chat", "hi"))  # the streaming method too
    assert front.registry.get_sample_value("raylane_auth_failures_total") == 3
    assert front.registry.get_sample_value("raylane_auth_lockouts_total") == 1

    front.clock.now += 60.5  # the window passes: the valid key works again, on both ports
    with Client(front.grpc_address, GOOD_KEY, timeout_s=10) as good:
        assert good.count_tokens("chat", "two words") == 2
    assert _models(front, GOOD_KEY).status_code == 200


def test_successes_do_not_count_and_another_peer_is_not_locked_out(front):
    with Client(front.grpc_address, GOOD_KEY, timeout_s=10) as good:
        for _ in range(10):
            assert good.count_tokens("chat", "a b c") == 3
    for _ in range(10):
        assert _models(front, GOOD_KEY).status_code == 200
    for _ in range(2):
        assert _models(front, "rl-wrong-key").status_code == 401
    assert _models(front, GOOD_KEY).status_code == 200  # 2 failures < 3: not locked
    # Lock loopback out, then check that another address's state is untouched.
    assert _models(front, "rl-wrong-key").status_code == 401
    assert _models(front, GOOD_KEY).status_code == 429
    assert front.limiter.retry_after_s("127.0.0.1") is not None
    assert front.limiter.retry_after_s("10.0.0.99") is None


def test_a_request_without_any_key_counts_as_a_failure(front):
    for _ in range(3):
        assert httpx.get(f"{front.http_url}/v1/models", timeout=10).status_code == 401
    assert _models(front, GOOD_KEY).status_code == 429
    # Health needs no key, so a probe sharing the locked-out address keeps working.
    assert httpx.get(f"{front.http_url}/health", timeout=10).status_code == 200

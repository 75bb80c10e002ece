"""Lockout of peers that keep failing authentication: a key-guessing client is cut off, the others are not slowed.

One `AuthFailureLimiter` per process front: a router replica's gRPC and HTTP ports share one (a peer locked out on
one is locked out on both), and the control plane's admin API has its own. Peers are IP addresses.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from router.errors import ResourceExhausted

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class AuthLimitConfig:
    """How many failed authentications a peer may make before it is locked out, and for how long."""

    max_failures: int = 10
    """Failures within `window_s` that lock a peer out; 0 turns the limit off."""
    window_s: float = 60.0
    """The window failures are counted over, and how long a lockout lasts."""
    max_peers: int = 10_000
    """Peers remembered at once (least recently failed forgotten first), so a flood of addresses cannot grow memory."""

    def __post_init__(self) -> None:
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ValueError(f"max_failures must be an integer >= 0 (0 turns the limit off), got {self.max_failures!r}")
        if not self.window_s > 0:
            raise ValueError(f"window_s must be positive, got {self.window_s!r}")
        if self.max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {self.max_peers!r}")


class AuthLimitMetrics:
    """The limiter's counters in one registry (one per registry: names register only once)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.failures = Counter(
            "raylane_auth_failures", "Failed authentications (unknown, revoked or no credential).", registry=registry
        )
        self.lockouts = Counter(
            "raylane_auth_lockouts", "Peers locked out for failing authentication too often.", registry=registry
        )


_metrics_by_registry: dict[int, AuthLimitMetrics] = {}


def auth_limit_metrics(registry: CollectorRegistry) -> AuthLimitMetrics:
    """The `AuthLimitMetrics` of `registry`, created on first use (a process's limiters share its counters)."""
    metrics = _metrics_by_registry.get(id(registry))
    if metrics is None:
        metrics = _metrics_by_registry[id(registry)] = AuthLimitMetrics(registry)
    return metrics


@dataclass
class _Peer:
    failures: deque[float]
    """Times of the failures inside the current window, oldest first."""
    locked_until: float = 0.0


class AuthFailureLimiter:
    """Counts failed authentications per peer; after `max_failures` within `window_s` the peer is locked out for
    `window_s`, whatever credential it sends. Successes neither count nor reset.

    State: the recent failure times of at most `max_peers` peers (an LRU). Not thread-safe: each owner calls it from
    one event loop.
    """

    def __init__(
        self,
        config: AuthLimitConfig | None = None,
        *,
        metrics: AuthLimitMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        surface: str = "router",
    ) -> None:
        self.config = config or AuthLimitConfig()
        self._metrics = metrics
        self._clock = clock
        self._surface = surface
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    @property
    def num_peers(self) -> int:
        """Peers currently remembered."""
        return len(self._peers)

    def retry_after_s(self, peer: str) -> float | None:
        """Seconds until `peer` may authenticate again, or None when it is not locked out."""
        state = self._peers.get(peer)
        if state is None:
            return None
        remaining = state.locked_until - self._clock()
        return remaining if remaining > 0 else None

    def record_failure(self, peer: str) -> bool:
        """Count one failed authentication of `peer`; True when this failure locks it out."""
        if self._metrics is not None:
            self._metrics.failures.inc()
        if self.config.max_failures == 0:
            return False
        now = self._clock()
        # Only the last `max_failures` times matter, so a peer's memory is bounded however fast it fails.
        state = self._peers.pop(peer, None) or _Peer(failures=deque(maxlen=self.config.max_failures))
        self._peers[peer] = state  # most recently failed last: the LRU evicts from the front
        while state.failures and state.failures[0] <= now - self.config.window_s:
            state.failures.popleft()
        state.failures.append(now)
        is_lockout = len(state.failures) >= self.config.max_failures and state.locked_until <= now
        if is_lockout:
            state.locked_until = now + self.config.window_s
            state.failures.clear()
            if self._metrics is not None:
                self._metrics.lockouts.inc()
            logger.warning(
                "auth lockout surface=%s peer=%s failures=%d window_s=%.0f locked_s=%.0f",
                self._surface,
                peer,
                self.config.max_failures,
                self.config.window_s,
                self.config.window_s,
            )
        while len(self._peers) > self.config.max_peers:
            self._peers.popitem(last=False)
        return is_lockout


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`, `unix:/path`) or `host:port`."""
    kind, sep, rest = peer.partition(":")
    if not sep:
        return peer
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind in ("unix", "unix-abstract"):
        return peer
    return kind  # `host:port`


def lockout_error(limiter: AuthFailureLimiter, peer: str) -> ResourceExhausted | None:
    """The refusal a locked-out `peer` gets (RESOURCE_EXHAUSTED / HTTP 429 with a retry hint), or None."""
    retry_after_s = limiter.retry_after_s(peer)
    if retry_after_s is None:
        return None
    return ResourceExhausted(
        f"too many failed authentications from {peer}; retry in {retry_after_s:.0f} s", retry_after_s=retry_after_s
    )

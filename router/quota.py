"""Per-tenant quotas: a concurrency cap and a tokens-per-minute token bucket.

A request reserves its worst case (prompt estimate + max_tokens) when admitted, and settles
to its real usage when it finishes, so a tenant cannot burst past its budget with long
generations, yet short answers are not over-charged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class QuotaLimits:
    """One tenant's limits (mirrors `control_plane.spec.Quota`, which the router receives in its snapshot)."""

    max_concurrent: int
    """Requests in flight at once."""
    tokens_per_minute: int
    """Sustained prompt + output tokens per minute."""
    burst_tokens: int | None = None
    """Bucket capacity; None means `tokens_per_minute`."""

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.tokens_per_minute < 1:
            raise ValueError("max_concurrent and tokens_per_minute must be >= 1")

    @property
    def capacity(self) -> int:
        return self.burst_tokens or self.tokens_per_minute


class QuotaExceededError(RuntimeError):
    """The tenant is over its quota; `retry_after_s` says when a retry can succeed."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Bucket:
    tokens: float
    updated: float
    inflight: int = 0


@dataclass(frozen=True)
class Reservation:
    tenant: str
    tokens: int


class QuotaTracker:
    """Admission against every tenant's limits. Not thread-safe: the router calls it from its event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, tenant: str, limits: QuotaLimits, tokens: int) -> Reservation:
        """Admit a request costing up to `tokens`, or raise `QuotaExceededError`."""
        bucket = self._refill(tenant, limits)
        if bucket.inflight >= limits.max_concurrent:
            self._log_refusal(tenant, "max_concurrent", bucket)
            raise QuotaExceededError(
                f"tenant {tenant!r} already has {bucket.inflight} requests in flight (max_concurrent="
                f"{limits.max_concurrent})",
                retry_after_s=1.0,
            )
        # A single request larger than the bucket could never run; admit it against a full bucket.
        cost = min(tokens, limits.capacity)
        if bucket.tokens < cost:
            rate = limits.tokens_per_minute / 60.0
            retry = (cost - bucket.tokens) / rate
            self._log_refusal(tenant, "tokens_per_minute", bucket)
            raise QuotaExceededError(
                f"tenant {tenant!r} is over its token budget ({limits.tokens_per_minute} tokens/min); "
                f"retry in {retry:.1f}s",
                retry_after_s=retry,
            )
        bucket.tokens -= cost
        bucket.inflight += 1
        return Reservation(tenant=tenant, tokens=cost)

    def release(self, reservation: Reservation, limits: QuotaLimits, used_tokens: int) -> None:
        """Finish a request: refund what it reserved but did not use (or charge the overrun)."""
        bucket = self._refill(reservation.tenant, limits)
        bucket.inflight = max(0, bucket.inflight - 1)
        bucket.tokens = min(limits.capacity, bucket.tokens + reservation.tokens - used_tokens)

    def inflight(self, tenant: str) -> int:
        bucket = self._buckets.get(tenant)
        return 0 if bucket is None else bucket.inflight

    def _refill(self, tenant: str, limits: QuotaLimits) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(tokens=float(limits.capacity), updated=now)
        rate = limits.tokens_per_minute / 60.0
        bucket.tokens = min(float(limits.capacity), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        return bucket

    @staticmethod
    def _log_refusal(tenant: str, limit: str, bucket: _Bucket) -> None:
        logger.info(
            "quota refused tenant=%s limit=%s inflight=%d tokens=%.0f", tenant, limit, bucket.inflight, bucket.tokens
        )

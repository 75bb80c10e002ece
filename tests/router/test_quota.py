"""QuotaTracker: the concurrency cap and the tokens-per-minute bucket, driven by a fake clock."""

from __future__ import annotations

import pytest

from router.quota import QuotaExceededError, QuotaLimits, QuotaTracker, Reservation


class FakeClock:
    """Seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker(clock) -> QuotaTracker:
    return QuotaTracker(clock=clock)


PER_SECOND = QuotaLimits(max_concurrent=100, tokens_per_minute=60)
"""Refills one token per second: easy arithmetic."""


def test_limits_reject_non_positive_values():
    with pytest.raises(ValueError, match="max_concurrent"):
        QuotaLimits(max_concurrent=0, tokens_per_minute=10)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        QuotaLimits(max_concurrent=1, tokens_per_minute=0)


def test_capacity_is_the_burst_or_else_the_per_minute_rate():
    assert QuotaLimits(max_concurrent=1, tokens_per_minute=600).capacity == 600
    assert QuotaLimits(max_concurrent=1, tokens_per_minute=600, burst_tokens=50).capacity == 50


def test_a_new_tenant_starts_with_a_full_bucket(tracker):
    reservation = tracker.acquire("acme", PER_SECOND, 60)
    assert reservation == Reservation(tenant="acme", tokens=60)
    assert tracker.inflight("acme") == 1
    assert tracker.inflight("globex") == 0


def test_an_empty_bucket_refuses_with_the_time_until_enough_refills(tracker, clock):
    tracker.acquire("acme", PER_SECOND, 50)
    with pytest.raises(QuotaExceededError, match="token budget") as info:
        tracker.acquire("acme", PER_SECOND, 25)
    assert info.value.retry_after_s == pytest.approx(15.0)
    clock.advance(14.9)
    with pytest.raises(QuotaExceededError):
        tracker.acquire("acme", PER_SECOND, 25)
    clock.advance(0.1)
    assert tracker.acquire("acme", PER_SECOND, 25).tokens == 25


def test_a_refused_request_takes_nothing_from_the_bucket(tracker, clock):
    tracker.acquire("acme", PER_SECOND, 60)
    for _ in range(3):
        with pytest.raises(QuotaExceededError):
            tracker.acquire("acme", PER_SECOND, 10)
    assert tracker.inflight("acme") == 1
    clock.advance(10)
    assert tracker.acquire("acme", PER_SECOND, 10).tokens == 10


def test_refill_stops_at_the_bucket_capacity(tracker, clock):
    limits = QuotaLimits(max_concurrent=100, tokens_per_minute=60, burst_tokens=20)
    tracker.acquire("acme", limits, 20)
    clock.advance(3600)
    tracker.acquire("acme", limits, 20)
    with pytest.raises(QuotaExceededError) as info:
        tracker.acquire("acme", limits, 1)
    assert info.value.retry_after_s == pytest.approx(1.0)


def test_a_request_larger_than_the_bucket_is_charged_a_full_bucket(tracker):
    limits = QuotaLimits(max_concurrent=100, tokens_per_minute=60, burst_tokens=30)
    assert tracker.acquire("acme", limits, 1000).tokens == 30
    with pytest.raises(QuotaExceededError):
        tracker.acquire("acme", limits, 1)


def test_the_concurrency_cap_refuses_until_a_request_finishes(tracker):
    limits = QuotaLimits(max_concurrent=2, tokens_per_minute=6000)
    first = tracker.acquire("acme", limits, 1)
    tracker.acquire("acme", limits, 1)
    with pytest.raises(QuotaExceededError, match="max_concurrent=2") as info:
        tracker.acquire("acme", limits, 1)
    assert info.value.retry_after_s == 1.0
    tracker.release(first, limits, used_tokens=1)
    assert tracker.inflight("acme") == 1
    tracker.acquire("acme", limits, 1)
    assert tracker.inflight("acme") == 2


def test_release_refunds_what_a_request_reserved_but_did_not_use(tracker):
    reservation = tracker.acquire("acme", PER_SECOND, 60)
    tracker.release(reservation, PER_SECOND, used_tokens=20)
    assert tracker.inflight("acme") == 0
    tracker.acquire("acme", PER_SECOND, 40)
    with pytest.raises(QuotaExceededError) as info:
        tracker.acquire("acme", PER_SECOND, 1)
    assert info.value.retry_after_s == pytest.approx(1.0)


def test_release_charges_an_overrun_so_the_next_request_waits_longer(tracker):
    reservation = tracker.acquire("acme", PER_SECOND, 50)
    tracker.release(reservation, PER_SECOND, used_tokens=70)
    # 60 - 70 = -10 tokens left: 10 tokens take 20 s to become available.
    with pytest.raises(QuotaExceededError) as info:
        tracker.acquire("acme", PER_SECOND, 10)
    assert info.value.retry_after_s == pytest.approx(20.0)


def test_release_never_fills_the_bucket_past_its_capacity(tracker, clock):
    reservation = tracker.acquire("acme", PER_SECOND, 30)
    clock.advance(3600)
    tracker.release(reservation, PER_SECOND, used_tokens=0)
    tracker.acquire("acme", PER_SECOND, 60)
    with pytest.raises(QuotaExceededError):
        tracker.acquire("acme", PER_SECOND, 1)


def test_inflight_never_goes_below_zero_on_a_double_release(tracker):
    reservation = tracker.acquire("acme", PER_SECOND, 1)
    tracker.release(reservation, PER_SECOND, used_tokens=1)
    tracker.release(reservation, PER_SECOND, used_tokens=1)
    assert tracker.inflight("acme") == 0


def test_tenants_have_separate_buckets(tracker):
    tracker.acquire("acme", PER_SECOND, 60)
    with pytest.raises(QuotaExceededError):
        tracker.acquire("acme", PER_SECOND, 1)
    assert tracker.acquire("globex", PER_SECOND, 60).tenant == "globex"

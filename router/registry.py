"""Routing policies by name, so a router (or a benchmark) can be configured with a string."""

from __future__ import annotations

from collections.abc import Callable

from router.baselines import LeastOutstandingPolicy, PowerOfTwoPolicy, RoundRobinPolicy
from router.policy import (
    AdapterAffinityScorer,
    KvPressureScorer,
    LeastLoadedPolicy,
    LoadScorer,
    Policy,
    PredictedKvScorer,
    WeightedPolicy,
    WeightedTerm,
)


def _weighted() -> Policy:
    # Load first; KV pressure and adapter residency break near-ties (the weights are in "requests").
    terms = (
        WeightedTerm(scorer=LoadScorer(), weight=1.0),
        WeightedTerm(scorer=KvPressureScorer(), weight=2.0),
        WeightedTerm(scorer=AdapterAffinityScorer(), weight=0.5),
    )
    return WeightedPolicy(terms, name="weighted")


def _raylane() -> Policy:
    # Predicted KV demand (length-aware: predicted output x KV per token) leads; load and adapter residency follow.
    terms = (
        WeightedTerm(scorer=PredictedKvScorer(), weight=4.0),
        WeightedTerm(scorer=LoadScorer(), weight=0.5),
        WeightedTerm(scorer=AdapterAffinityScorer(), weight=0.5),
    )
    return WeightedPolicy(terms, name="raylane")


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobinPolicy,
    "least_outstanding": LeastOutstandingPolicy,
    "p2c": lambda: PowerOfTwoPolicy(seed=0),
    "least_loaded": LeastLoadedPolicy,
    "weighted": _weighted,
    "raylane": _raylane,
}
"""Every policy a router can run; baselines are kept for comparison (bench/routing.py)."""

DEFAULT_POLICY = "least_loaded"


def make_policy(name: str) -> Policy:
    """A fresh policy instance (stateful ones, like round-robin, must not be shared between routers)."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return factory()

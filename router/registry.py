"""Routing policies by name, so a router (or a benchmark) can be configured with a string."""

from __future__ import annotations

from collections.abc import Callable

from router.baselines import LeastOutstandingPolicy, PowerOfTwoPolicy, PrefixCachePolicy, RoundRobinPolicy
from router.full_policy import RaylanePolicy
from router.policy import (
    AdapterAffinityScorer,
    KvPressureScorer,
    LeastLoadedPolicy,
    LoadScorer,
    Policy,
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


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobinPolicy,
    "least_outstanding": LeastOutstandingPolicy,
    "p2c": lambda: PowerOfTwoPolicy(seed=0),
    # SGLang router's `cache_aware` (defaults cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold
    # 1.5): the longest cached prefix unless the pool is imbalanced; the prefix-aware baseline raylane must beat.
    "prefix_cache": PrefixCachePolicy,
    "least_loaded": LeastLoadedPolicy,
    "weighted": _weighted,
    "raylane": RaylanePolicy,
}
"""Every policy a router can run; baselines are kept for comparison (bench/routing.py)."""

DEFAULT_POLICY = "raylane"
"""The full policy (router/full_policy.py): what a router runs unless told otherwise."""


def make_policy(name: str) -> Policy:
    """A fresh policy instance (stateful ones, like round-robin, must not be shared between routers)."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return factory()

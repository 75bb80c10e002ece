"""raylane's full routing policy: length-, prefix-, LoRA- and load-aware placement per pool.

One `WeightedPolicy` whose terms apply by pool:

- prefill pool: LAPS length class (short and long prompts on disjoint workers, by a learned threshold), queued
  prefill tokens, load, and prefix-cache affinity (bounded by load, so a hot prefix cannot pile onto one worker);
- decode pool: forecast peak KV with the request added (predicted output x KV per token), load, and LoRA
  adapter residency;
- mixed pool: the decode terms plus prefix affinity (a mixed worker also runs the prompt).

Weights are in "queued requests": a term of weight w moves a worker by up to w requests' worth of load.
Stateful only through the LAPS splitter, which learns the prompt-length distribution from the requests it
routes, so a fixed request sequence replays to the same decisions (the simulator relies on that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from router.laps import LapsConfig, LapsPrefillScorer, LengthSplitter
from router.policy import (
    AdapterAffinityScorer,
    ClusterView,
    Decision,
    LoadScorer,
    PredictedKvScorer,
    PrefillBacklogScorer,
    RouteRequest,
    WeightedPolicy,
    WeightedTerm,
    WorkerView,
)
from router.prefix_affinity import PrefixAffinityConfig, PrefixAffinityScorer

_PREFILL = frozenset({"prefill"})
_DECODING = frozenset({"decode", "mixed"})
_PROMPT = frozenset({"prefill", "mixed"})


@dataclass(kw_only=True, frozen=True)
class RaylanePolicyConfig:
    """Weights of the full policy's terms (all finite and >= 0; 0 turns a term off but keeps it in the log)."""

    predicted_kv_weight: float = 4.0
    """Decode and mixed pools: forecast peak KV occupancy (fraction of the pool) with the request added."""
    decode_load_weight: float = 0.5
    """Decode and mixed pools: outstanding requests, a tie-breaker once KV demand is balanced."""
    adapter_weight: float = 0.5
    """Decode and mixed pools: 1 when the request's LoRA adapter is not resident (a load before decoding)."""
    prefill_backlog_weight: float = 1.0
    """Prefill pool: queued prefill tokens, per LAPS-threshold-sized prompt (the learned short/long boundary)."""
    prefill_load_weight: float = 0.5
    """Prefill pool: outstanding requests; fresher than the backlog (it counts this router's placements since
    the worker's last report)."""
    prefix_weight: float = 10.0
    """Prefill and mixed pools: share of the prompt the worker must compute (0 when it is all cached). Above
    `laps_weight`, so a (nearly) whole-prompt hit crosses the length partition: a cached prompt is cheap
    whatever its length. The load bound (`prefix.max_load_gap`) still caps what a hit can attract."""
    laps_weight: float = 8.0
    """Prefill pool: serving the other length class costs this many queued requests (a soft partition)."""
    laps: LapsConfig = field(default_factory=LapsConfig)
    """How prompts are split into short and long and prefill workers into the two classes."""
    prefix: PrefixAffinityConfig = field(default_factory=PrefixAffinityConfig)
    """How far load may void a cache hit, and how much of a prompt is hashed."""

    def __post_init__(self) -> None:
        for name in (
            "predicted_kv_weight",
            "decode_load_weight",
            "adapter_weight",
            "prefill_backlog_weight",
            "prefill_load_weight",
            "prefix_weight",
            "laps_weight",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")


class RaylanePolicy:
    """`Policy`: the full policy (see the module docstring); the router's default."""

    name = "raylane"

    def __init__(self, config: RaylanePolicyConfig | None = None) -> None:
        self.config = config or RaylanePolicyConfig()
        self.splitter = LengthSplitter(self.config.laps)
        self._init_weighted()

    def _init_weighted(self) -> None:
        # The pool-aware scorers (LAPS partition, prefix load bound) read the view being routed on, one pool
        # list per (deployment, role) and decision rather than one per scored worker.
        self._view = ClusterView()
        self._pools: dict[tuple[str, str], list[WorkerView]] = {}
        pool = self._pool
        c = self.config
        self.weighted = WeightedPolicy(
            (
                WeightedTerm(scorer=PredictedKvScorer(), weight=c.predicted_kv_weight, roles=_DECODING),
                WeightedTerm(scorer=LoadScorer(), weight=c.decode_load_weight, roles=_DECODING),
                WeightedTerm(scorer=AdapterAffinityScorer(), weight=c.adapter_weight, roles=_DECODING),
                WeightedTerm(
                    scorer=PrefillBacklogScorer(unit_tokens=lambda: self.splitter.threshold),
                    weight=c.prefill_backlog_weight,
                    roles=_PREFILL,
                ),
                WeightedTerm(scorer=LoadScorer(), weight=c.prefill_load_weight, roles=_PREFILL),
                WeightedTerm(scorer=LapsPrefillScorer(self.splitter, pool=pool), weight=c.laps_weight, roles=_PREFILL),
                WeightedTerm(scorer=PrefixAffinityScorer(c.prefix, pool=pool), weight=c.prefix_weight, roles=_PROMPT),
            ),
            name=self.name,
        )

    def _pool(self, request: RouteRequest, worker: WorkerView) -> list[WorkerView]:
        key = (worker.deployment, worker.role)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = self._view.candidates(*key)
        return pool

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        self._view, self._pools = view, {}
        try:
            decision = self.weighted.route(request, view)
        finally:
            # Do not keep a snapshot (and its workers) alive between requests.
            self._view, self._pools = ClusterView(), {}
        # After the decision, as LAPS prescribes: a request is classified by the lengths seen before it.
        self.splitter.observe(request.num_prompt_tokens_estimate)
        return decision

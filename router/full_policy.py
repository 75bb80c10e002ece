"""raylane's full routing policy: length-, prefix-, LoRA- and load-aware placement per pool.

One `WeightedPolicy` whose terms apply by pool:

- prefill pool: LAPS length class (short and long prompts on disjoint workers, by a learned threshold), queued
  prefill tokens, load, and prefix-cache affinity (bounded by load, so a hot prefix cannot pile onto one worker);
- decode pool: forecast peak KV with the request added (predicted output x KV per token), load, and LoRA
  adapter residency;
- mixed pool: the decode terms plus queued prefill tokens and prefix affinity (a mixed worker also runs the
  prompt: its queued prefill delays the newcomer's first token and, chunk by chunk, every decode step there).

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
from router.raylane_search import RaylaneSearch

_PREFILL = frozenset({"prefill"})
_DECODING = frozenset({"decode", "mixed"})
_PROMPT = frozenset({"prefill", "mixed"})
_DECODE = frozenset({"decode"})
_MIXED = frozenset({"mixed"})


@dataclass(kw_only=True, frozen=True)
class RaylanePolicyConfig:
    """Weights of the full policy's terms (all finite and >= 0; 0 turns a term off but keeps it in the log)."""

    predicted_kv_weight: float = 4.0
    """Decode pool: forecast peak KV occupancy (fraction of the pool) with the request added."""
    mixed_predicted_kv_weight: float = 1.0
    """Mixed pool: the same forecast. Lower than on a decode pool because there it competes with queued prefill,
    not with request counts: a whole pool's KV difference weighs as one threshold-sized queued prompt, so an
    abundant KV pool (where the forecast only adds length-prediction noise) no longer outvotes the backlog."""
    decode_load_weight: float = 0.5
    """Decode pool: outstanding requests, a tie-breaker once KV demand is balanced."""
    mixed_load_weight: float = 0.02
    """Mixed pool: outstanding requests, only a tie-breaker. A running decode takes one token of a mixed worker's
    step budget, while queued prefill (`prefill_backlog_weight`) takes whole chunks: weighing requests like prompts
    (as least-outstanding does) sends a newcomer behind a long prompt to spare it a few short decodes."""
    adapter_weight: float = 0.5
    """Decode and mixed pools: 1 when the request's LoRA adapter is not resident (a load before decoding)."""
    prefill_backlog_weight: float = 1.0
    """Prefill and mixed pools: queued prefill tokens, per LAPS-threshold-sized prompt (the learned short/long
    boundary). Request counts hide job size: one queued long prompt delays a newcomer more than several short ones."""
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
    prefix: PrefixAffinityConfig = field(default_factory=lambda: PrefixAffinityConfig(max_load_gap=16.0))
    """How far load may void a cache hit, and how much of a prompt is hashed. The gap is wider than the scorer's
    own default: the backlog term already prices a hot prefix holder's queued prompts, so a count gap of a few
    short requests should not void a hit that saves a long prompt's prefill."""

    def __post_init__(self) -> None:
        for name in (
            "predicted_kv_weight",
            "mixed_predicted_kv_weight",
            "decode_load_weight",
            "mixed_load_weight",
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
        prefix = PrefixAffinityScorer(c.prefix, pool=pool)
        terms = (
            WeightedTerm(scorer=PredictedKvScorer(), weight=c.predicted_kv_weight, roles=_DECODE),
            WeightedTerm(scorer=PredictedKvScorer(), weight=c.mixed_predicted_kv_weight, roles=_MIXED),
            WeightedTerm(scorer=LoadScorer(), weight=c.decode_load_weight, roles=_DECODE),
            WeightedTerm(scorer=LoadScorer(), weight=c.mixed_load_weight, roles=_MIXED),
            WeightedTerm(scorer=AdapterAffinityScorer(), weight=c.adapter_weight, roles=_DECODING),
            WeightedTerm(
                scorer=PrefillBacklogScorer(unit_tokens=lambda: self.splitter.threshold),
                weight=c.prefill_backlog_weight,
                roles=_PROMPT,
            ),
            WeightedTerm(scorer=LoadScorer(), weight=c.prefill_load_weight, roles=_PREFILL),
            WeightedTerm(scorer=LapsPrefillScorer(self.splitter, pool=pool), weight=c.laps_weight, roles=_PREFILL),
            WeightedTerm(scorer=prefix, weight=c.prefix_weight, roles=_PROMPT),
        )
        # With a view's pool index, decode and mixed pools score a few workers, with a full scan's decisions.
        search = RaylaneSearch(terms, prefix=prefix)
        self.weighted = WeightedPolicy(terms, name=self.name, search=search)

    def _pool(self, request: RouteRequest, worker: WorkerView) -> list[WorkerView]:
        key = (worker.deployment, worker.role)
        pool = self._pools.get(key)
        if pool is None:
            index = self._view.index.pool(*key) if self._view.index is not None else None
            if index is not None and worker.role != "prefill":
                # Off prefill pools only the prefix term reads the pool, and only its least load: the least-loaded
                # worker stands for the pool, so the index spares building the whole list.
                least = index.least_loaded()
                pool = self._pools[key] = [least] if least is not None else []
            else:
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

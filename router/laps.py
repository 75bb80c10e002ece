"""LAPS, length-aware prefill scheduling: keep short prefills from queueing behind long ones.

A `LengthSplitter` learns the short/long threshold from recent prompt lengths (a decayed log-bucket
histogram) and moves it only past a relative dead band, so classes do not flap. `LapsPrefillScorer` (a term of
the `raylane` policy) sends short and long prefills to disjoint subsets of the prefill workers, sized by each
class's share of prefill tokens. LAPS in time, on one worker, is the engine's (`workers/engine/waiting_order.py`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from router.log_histogram import LogHistogram
from router.policy import RouteRequest, WorkerView
from router.prefix_affinity import PoolProvider

logger = logging.getLogger(__name__)

LengthClass = Literal["short", "long"]

_RESCALE_AT = 1e150  # lazy decay grows the increment geometrically; fold it back before floats overflow


@dataclass(kw_only=True, frozen=True)
class LapsConfig:
    """How LAPS splits prompts into short and long and partitions the prefill workers between them."""

    split: Literal["quantile", "token_balance"] = "quantile"
    """`quantile`: the threshold is a quantile of prompt lengths; `token_balance`: the length below which
    prompts carry `short_token_share` of all prefill tokens."""
    quantile: float = 0.75
    """For `split="quantile"`: the share of requests classed short, in (0, 1)."""
    short_token_share: float = 0.5
    """For `split="token_balance"`: the share of prefill tokens the short class carries, in (0, 1)."""
    initial_threshold: int = 512
    """Threshold in prompt tokens until `min_samples` lengths were seen; a prompt <= threshold is short."""
    min_samples: int = 64
    """Observations before the learned threshold replaces `initial_threshold`; >= 1."""
    half_life: float = 2000.0
    """Observations after which an old prompt counts half; > 0. Lets the threshold follow drift."""
    bins_per_octave: int = 8
    """Histogram resolution: bins per doubling of prompt length; >= 1."""
    hysteresis: float = 0.15
    """Relative dead band: the threshold moves only when the estimate differs by more than this; >= 0."""
    recompute_every: int = 16
    """Re-estimate the threshold every this many observations; >= 1."""
    partition_hysteresis: float = 0.25
    """Extra workers' worth of drift in the ideal split before a worker changes class; >= 0."""

    def __post_init__(self) -> None:
        if self.split not in ("quantile", "token_balance"):
            raise ValueError(f"split must be 'quantile' or 'token_balance', got {self.split!r}")
        for name in ("quantile", "short_token_share"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("initial_threshold", "min_samples", "bins_per_octave", "recompute_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.half_life) and self.half_life > 0):
            raise ValueError(f"half_life must be finite and > 0, got {self.half_life}")
        for name in ("hysteresis", "partition_hysteresis"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")


# ---- the threshold ----------------------------------------------------------------------------------------------


class LengthSplitter:
    """Streaming short/long threshold over prompt lengths, with exponential forgetting and hysteresis.

    Two `LogHistogram`s over prompt lengths: one weighted by requests, one by their tokens. The estimate is
    the length where the chosen one's cumulative weight crosses the target, interpolated inside its bin.
    """

    def __init__(self, config: LapsConfig | None = None) -> None:
        self.config = config or LapsConfig()
        self._init_state()

    def _init_state(self) -> None:
        self._requests = LogHistogram(self.config.bins_per_octave)
        self._tokens = LogHistogram(self.config.bins_per_octave)
        self._increment = 1.0
        self._growth = 2.0 ** (1.0 / self.config.half_life)
        self.num_observed = 0
        self.num_threshold_changes = 0
        self.threshold = self.config.initial_threshold

    def classify(self, num_prompt_tokens: int) -> LengthClass:
        return "short" if num_prompt_tokens <= self.threshold else "long"

    def observe(self, num_prompt_tokens: int) -> None:
        """Count one prompt; every `recompute_every` observations, maybe move the threshold."""
        length = max(int(num_prompt_tokens), 1)
        self._requests.add(length, self._increment)
        self._tokens.add(length, self._increment * length)
        # Growing the weight of new samples is the same as decaying all old ones, at O(1) per observation.
        self._increment *= self._growth
        if self._increment > _RESCALE_AT:
            self._rescale()
        self.num_observed += 1
        if self.num_observed >= self.config.min_samples and self.num_observed % self.config.recompute_every == 0:
            self._maybe_move(self.estimate())

    def estimate(self) -> int:
        """The threshold the recent distribution implies now, before hysteresis."""
        if self.config.split == "quantile":
            histogram, share = self._requests, self.config.quantile
        else:
            histogram, share = self._tokens, self.config.short_token_share
        (value,) = histogram.quantiles((share,))
        return 1 if math.isnan(value) else max(round(value), 1)

    def long_token_share(self) -> float:
        """Share of recent prefill tokens in prompts above the current threshold, in [0, 1]."""
        if self._tokens.total <= 0:
            return 0.0
        return self._tokens.mass_above(self.threshold) / self._tokens.total

    def _maybe_move(self, estimate: int) -> None:
        if abs(estimate - self.threshold) <= self.config.hysteresis * self.threshold:
            return
        logger.info(
            "laps threshold old=%d new=%d split=%s observed=%d long_token_share=%.3f",
            self.threshold,
            estimate,
            self.config.split,
            self.num_observed,
            self.long_token_share(),
        )
        self.threshold = estimate
        self.num_threshold_changes += 1

    def _rescale(self) -> None:
        scale = 1.0 / self._increment
        self._requests.scale(scale)
        self._tokens.scale(scale)
        self._increment = 1.0


# ---- in space: disjoint worker subsets ---------------------------------------------------------------------------


def num_long_workers(num_workers: int, long_token_share: float, previous: int | None, hysteresis: float) -> int:
    """Prefill workers reserved for long prompts, proportional to their token share.

    With two or more workers each class keeps at least one, so a burst of the other class cannot block it.
    A single worker serves both (0 reserved). `previous` stays while the ideal is within `0.5 + hysteresis`.
    """
    if num_workers < 2:
        return 0
    ideal = num_workers * min(max(long_token_share, 0.0), 1.0)
    if previous is not None and 1 <= previous <= num_workers - 1 and abs(ideal - previous) < 0.5 + hysteresis:
        return previous
    return min(max(round(ideal), 1), num_workers - 1)


class PrefillPartitioner:
    """Splits each (deployment, role) pool into short and long workers; remembers splits for hysteresis.

    Workers are ordered by id and the long class takes the tail, so a change in size moves one worker at a time.
    """

    def __init__(self, config: LapsConfig) -> None:
        self.config = config
        self._num_long: dict[tuple[str, str], int] = {}

    def members(self, pool: Sequence[WorkerView], length_class: LengthClass, long_token_share: float) -> list[str]:
        """Worker ids of `pool` that serve `length_class` (all of them when the pool has one worker)."""
        if not pool:
            return []
        ordered = sorted(w.worker_id for w in pool)
        key = (pool[0].deployment, pool[0].role)
        k = num_long_workers(len(ordered), long_token_share, self._num_long.get(key), self.config.partition_hysteresis)
        self._num_long[key] = k
        if k == 0:
            return ordered
        return ordered[len(ordered) - k :] if length_class == "long" else ordered[: len(ordered) - k]


class LapsPrefillScorer:
    """`Scorer`: 0 when `worker` serves the request's length class, 1 when it serves the other class.

    Does not learn: whoever owns the splitter calls `splitter.observe(num_prompt_tokens)` once per request.
    Only workers whose role is in `partition_roles` are partitioned; the others score 0.
    """

    name = "laps"

    def __init__(
        self,
        splitter: LengthSplitter,
        *,
        pool: PoolProvider,
        partition_roles: frozenset[str] = frozenset({"prefill"}),
    ) -> None:
        self.splitter = splitter
        self.partitioner = PrefillPartitioner(splitter.config)
        self.pool = pool
        self.partition_roles = partition_roles
        # One request is scored against every worker of a pool in turn: partition the pool once per request
        # object (identity, not id: callers may reuse request ids, and the splitter may have moved since).
        self._memo_request: RouteRequest | None = None
        self._memo_pool: tuple[str, str] = ("", "")
        self._memo_members: frozenset[str] = frozenset()

    def score(self, request: RouteRequest, worker: WorkerView) -> float:
        if worker.role not in self.partition_roles:
            return 0.0
        pool_key = (worker.deployment, worker.role)
        if request is not self._memo_request or pool_key != self._memo_pool:
            length_class = self.splitter.classify(request.num_prompt_tokens_estimate)
            share = self.splitter.long_token_share()
            self._memo_members = frozenset(self.partitioner.members(self.pool(request, worker), length_class, share))
            self._memo_request, self._memo_pool = request, pool_key
        return 0.0 if worker.worker_id in self._memo_members else 1.0

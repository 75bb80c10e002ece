"""Complexity-aware routing: score how hard a prompt is, then pick the small or the large model tier.

A `ComplexityScorer` maps a prompt to [0, 1]. The default, `LogisticComplexityScorer`, is a logistic model
over cheap text features with fixed initial weights, trained online by SGD from logged outcomes (was the
small tier's answer good enough?). `TierSelector` sends a prompt to the large tier when its score reaches a
threshold calibrated as a quantile of recent scores, so a target share of traffic goes large whatever the
scorer's scale (RouteLLM-style calibration). A request that pins a tier gets it and stays out of calibration.

Plain Python and JSON-serialisable (`to_dict`/`from_dict`), so the model can live in the state store.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

logger = logging.getLogger(__name__)

Features = Mapping[str, float]
Tier = Literal["small", "large"]

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_OPERATOR = re.compile(r"[-+*/^%=<>]|\*\*|sqrt|log|mod")
_HARD_WORDS = (
    "prove",
    "derive",
    "integral",
    "theorem",
    "optimi",
    "algorithm",
    "complexity",
    "step by step",
    "why",
    "explain",
    "debug",
    "analy",
    "compare",
    "evaluate",
)
_EASY_WORDS = ("hello", "hi ", "thanks", "thank you", "translate", "what time", "define", "who is", "capital of")

FEATURE_NAMES = (
    "log_chars",
    "num_numbers",
    "max_digits",
    "num_operators",
    "max_nesting",
    "hard_words",
    "easy_words",
    "num_lines",
    "has_code",
)
"""Features `complexity_features` computes; each is scaled to roughly [0, 2] so one learning rate suits all."""


def complexity_features(text: str) -> dict[str, float]:
    """Cheap text features of difficulty: size, numbers, operators, bracket nesting, cue words, code."""
    lowered = text.lower()
    numbers = _NUMBER.findall(text)
    return {
        "log_chars": math.log1p(len(text)) / 8.0,
        "num_numbers": math.log1p(len(numbers)) / 3.0,
        "max_digits": min(max((len(n.replace(".", "")) for n in numbers), default=0) / 8.0, 2.0),
        "num_operators": math.log1p(len(_OPERATOR.findall(lowered))) / 3.0,
        "max_nesting": min(_max_nesting(text) / 4.0, 2.0),
        "hard_words": math.log1p(sum(lowered.count(w) for w in _HARD_WORDS)),
        "easy_words": math.log1p(sum(lowered.count(w) for w in _EASY_WORDS)),
        "num_lines": math.log1p(text.count("\n")) / 3.0,
        "has_code": float("```" in text or "def " in text or "{" in text),
    }


def _max_nesting(text: str) -> int:
    depth = deepest = 0
    for c in text:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth = max(depth - 1, 0)
    return deepest


class ComplexityScorer(Protocol):
    """How hard a prompt is, for picking a model tier."""

    def score(self, prompt_text: str, features: Features | None = None) -> float:
        """A value in [0, 1]; higher means the small tier is more likely to fail. `features` defaults to
        `complexity_features(prompt_text)` (pass them when already computed)."""
        ...


DEFAULT_WEIGHTS: Mapping[str, float] = {
    "log_chars": 0.5,
    "num_numbers": 1.0,
    "max_digits": 1.0,
    "num_operators": 1.5,
    "max_nesting": 1.5,
    "hard_words": 1.0,
    "easy_words": -1.0,
    "num_lines": 0.3,
    "has_code": 0.8,
}
"""Hand-set priors: every cue of difficulty counts up, greetings and look-ups count down."""
DEFAULT_BIAS = -3.0
"""Puts a short plain prompt near 0.1."""


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class LogisticComplexityScorer:
    """`ComplexityScorer`: sigmoid(bias + weights . features), trainable by online SGD with L2 decay."""

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        bias: float = DEFAULT_BIAS,
        learning_rate: float = 0.05,
        l2: float = 1e-4,
    ) -> None:
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and > 0, got {learning_rate}")
        if not (math.isfinite(l2) and l2 >= 0):
            raise ValueError(f"l2 must be finite and >= 0, got {l2}")
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        self.bias = bias
        self.learning_rate = learning_rate
        self.l2 = l2
        self.num_updates = 0

    def score(self, prompt_text: str, features: Features | None = None) -> float:
        return self.predict(features if features is not None else complexity_features(prompt_text))

    def predict(self, features: Features) -> float:
        z = self.bias + math.fsum(w * features.get(name, 0.0) for name, w in self.weights.items())
        return _sigmoid(z)

    def observe(self, prompt_text: str, is_hard: bool, features: Features | None = None) -> None:
        """Learn from one logged outcome: `is_hard` when the small tier's answer was not good enough."""
        self.update(features if features is not None else complexity_features(prompt_text), is_hard)

    def update(self, features: Features, is_hard: bool) -> None:
        """One SGD step on the log loss; feature names the model has not seen get a weight."""
        error = self.predict(features) - float(is_hard)
        for name, value in features.items():
            w = self.weights.get(name, 0.0)
            self.weights[name] = w - self.learning_rate * (error * value + self.l2 * w)
        self.bias -= self.learning_rate * error
        self.num_updates += 1

    def fit(self, samples: Sequence[tuple[Features, bool]], *, epochs: int = 5, seed: int = 0) -> None:
        """Several shuffled passes of `update` over logged (features, is_hard) pairs."""
        rng = random.Random(seed)
        order = list(range(len(samples)))
        for _ in range(epochs):
            rng.shuffle(order)
            for i in order:
                self.update(*samples[i])

    def to_dict(self) -> dict:
        return {
            "weights": dict(self.weights),
            "bias": self.bias,
            "learning_rate": self.learning_rate,
            "l2": self.l2,
            "num_updates": self.num_updates,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LogisticComplexityScorer:
        scorer = cls(data["weights"], bias=data["bias"], learning_rate=data["learning_rate"], l2=data["l2"])
        scorer.num_updates = int(data.get("num_updates", 0))
        return scorer


class LengthOnlyScorer:
    """`ComplexityScorer` baseline: longer prompts are harder; `half_at` characters score 0.5."""

    def __init__(self, half_at: float = 200.0) -> None:
        if not (math.isfinite(half_at) and half_at > 0):
            raise ValueError(f"half_at must be finite and > 0, got {half_at}")
        self.half_at = half_at

    def score(self, prompt_text: str, features: Features | None = None) -> float:
        return len(prompt_text) / (len(prompt_text) + self.half_at)


# ---- evaluation ----------------------------------------------------------------------------------------------------


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance a random hard prompt outscores a random easy one (ties count half).

    Computed from the rank sum (Mann-Whitney U) with mid-ranks for tied scores, in O(n log n).
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    num_pos = sum(1 for y in labels if y)
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError("AUC needs at least one hard and one easy example")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum = 0.0
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        mid_rank = (start + end) / 2.0 + 1.0
        rank_sum += mid_rank * sum(1 for i in order[start : end + 1] if labels[i])
        start = end + 1
    return (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


def large_share_for_recall(scores: Sequence[float], labels: Sequence[bool], recall: float = 0.95) -> float:
    """Least share of all prompts the large tier must take so that `recall` of the hard ones reach it.

    The threshold is the highest score that still keeps `recall` of hard prompts at or above it; every prompt
    scoring at or above it goes large.
    """
    hard = sorted((s for s, y in zip(scores, labels, strict=True) if y), reverse=True)
    if not hard:
        raise ValueError("needs at least one hard example")
    threshold = hard[math.ceil(recall * len(hard)) - 1]
    return sum(1 for s in scores if s >= threshold) / len(scores)


# ---- tier selection ------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class TierGroup:
    """A deployment group: the same task served by a small and a large model."""

    small: str
    """Deployment of the cheap tier."""
    large: str
    """Deployment of the strong tier."""

    def __post_init__(self) -> None:
        if not self.small or not self.large or self.small == self.large:
            raise ValueError(
                f"a tier group needs two distinct deployments, got small={self.small!r} large={self.large!r}"
            )


@dataclass(kw_only=True, frozen=True)
class TierSelectorConfig:
    """How the large-tier threshold is calibrated."""

    target_large_share: float = 0.2
    """Share of unpinned traffic to send to the large tier, in [0, 1]."""
    window: int = 2000
    """Recent unpinned scores the threshold is a quantile of; >= 1."""
    min_samples: int = 50
    """Scores needed before calibration replaces `initial_threshold`; in [1, window]."""
    initial_threshold: float = 0.5
    """Threshold before calibration, in [0, 1]; a score >= threshold goes large."""
    recalibrate_every: int = 16
    """Recompute the quantile every this many scores; >= 1."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_large_share <= 1.0:
            raise ValueError(f"target_large_share must be in [0, 1], got {self.target_large_share}")
        if not 0.0 <= self.initial_threshold <= 1.0:
            raise ValueError(f"initial_threshold must be in [0, 1], got {self.initial_threshold}")
        if self.window < 1 or self.recalibrate_every < 1:
            raise ValueError(f"window and recalibrate_every must be >= 1, got {self.window}, {self.recalibrate_every}")
        if not 1 <= self.min_samples <= self.window:
            raise ValueError(f"min_samples must be in [1, window={self.window}], got {self.min_samples}")


@dataclass(kw_only=True, frozen=True)
class TierDecision:
    """Which tier and deployment serve a request, and why."""

    tier: Tier
    """`small` or `large`."""
    deployment: str
    """The deployment of that tier."""
    score: float
    """The prompt's complexity score (NaN when pinned: it was not scored)."""
    threshold: float
    """The calibrated threshold at decision time."""
    is_pinned: bool
    """True when the request named its tier."""


class TierSelector:
    """Chooses the small or large tier of a `TierGroup` by complexity score against a calibrated threshold."""

    def __init__(
        self, group: TierGroup, scorer: ComplexityScorer | None = None, config: TierSelectorConfig | None = None
    ) -> None:
        self.group = group
        self.scorer = scorer or LogisticComplexityScorer()
        self.config = config or TierSelectorConfig()
        self._init_window()

    def _init_window(self) -> None:
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self.threshold = self.config.initial_threshold
        self.num_scored = 0

    def select(
        self, request_id: str, prompt_text: str, *, pinned_tier: str | None = None, features: Features | None = None
    ) -> TierDecision:
        """Pick the tier for one request; a pinned tier wins and is not scored or counted."""
        if pinned_tier is not None:
            if pinned_tier not in ("small", "large"):
                raise ValueError(f"pinned tier must be 'small' or 'large', got {pinned_tier!r}")
            decision = self._decide(pinned_tier, math.nan, is_pinned=True)
        else:
            score = min(max(float(self.scorer.score(prompt_text, features)), 0.0), 1.0)
            decision = self._decide("large" if score >= self.threshold else "small", score, is_pinned=False)
            self._record(score)
        logger.info(
            "tier request_id=%s group=%s/%s tier=%s deployment=%s score=%.4f threshold=%.4f pinned=%s",
            request_id,
            self.group.small,
            self.group.large,
            decision.tier,
            decision.deployment,
            decision.score,
            decision.threshold,
            decision.is_pinned,
        )
        return decision

    def _decide(self, tier: Tier, score: float, *, is_pinned: bool) -> TierDecision:
        deployment = self.group.large if tier == "large" else self.group.small
        return TierDecision(
            tier=tier, deployment=deployment, score=score, threshold=self.threshold, is_pinned=is_pinned
        )

    def _record(self, score: float) -> None:
        self._recent.append(score)
        bisect.insort(self._sorted, score)
        if len(self._recent) > self.config.window:
            oldest = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self.num_scored += 1
        if len(self._sorted) >= self.config.min_samples and self.num_scored % self.config.recalibrate_every == 0:
            self.threshold = calibrated_threshold(self._sorted, self.config.target_large_share)


def calibrated_threshold(sorted_scores: Sequence[float], target_large_share: float) -> float:
    """The score at which `score >= threshold` selects `target_large_share` of `sorted_scores` (ascending)."""
    n = len(sorted_scores)
    if n == 0:
        raise ValueError("calibration needs at least one score")
    if target_large_share <= 0.0:
        return math.nextafter(1.0, math.inf)  # above every score in [0, 1]: nothing goes large
    k = min(max(n - math.ceil(target_large_share * n), 0), n - 1)
    return sorted_scores[k]

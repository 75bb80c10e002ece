"""Online output-length prediction: quantiles (p50, p90) of how many tokens a request will generate.

The predictor learns from completed requests. Each request maps to a chain of feature keys, from the most
specific (tenant, deployment, adapter, prompt-length bucket, prompt shape) to the empty key (everything). Every
key holds a log-bucket histogram of observed output lengths. A prediction reads the most specific key with
enough observations and falls back along the chain, then to a log-normal prior. Updates touch one histogram
per chain level (O(1) for a fixed chain); the number of keys is capped with LRU eviction, and each histogram
halves its counts past a weight cap, so old traffic fades and memory stays bounded.

Pure Python and JSON-serialisable (`to_dict`/`from_dict`), so the control plane can keep it in Redis.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Protocol

from router.log_histogram import LogHistogram
from router.policy import RouteRequest

FEATURE_NAMES = ("tenant", "deployment", "adapter", "prompt_bucket", "shape")
"""What a backoff level may key on. `shape` exists only when prompt features were given."""

DEFAULT_BACKOFF: tuple[tuple[str, ...], ...] = (
    ("tenant", "deployment", "adapter", "prompt_bucket", "shape"),
    ("tenant", "deployment", "adapter", "prompt_bucket"),
    ("tenant", "deployment", "adapter"),
    ("deployment", "prompt_bucket"),
    ("deployment",),
    ("prompt_bucket",),
    (),
)

SERIAL_VERSION = 1
Key = tuple[tuple[str, str], ...]
Features = Mapping[str, float]

# Cue phrases that usually ask for a short or a long answer; matched lower-case, anywhere in the prompt.
_SHORT_CUES = ("briefly", "in one word", "one sentence", "yes or no", "tl;dr", "short answer", "just the number")
_LONG_CUES = ("in detail", "step by step", "essay", "write a story", "comprehensive", "write a blog", "long form")


@dataclass(kw_only=True, frozen=True)
class LengthPredictorConfig:
    """How the length predictor buckets, backs off, forgets and what it assumes before it has data."""

    prior_median_tokens: float = 256.0
    """Median output length assumed for a request no key has enough data for."""
    prior_sigma: float = 1.0
    """Log-space spread of the log-normal prior; 1.0 puts its p90 at about 3.6x the median."""
    min_observations: float = 16.0
    """A key answers only once its (decayed) observation weight reaches this; coarser keys answer before."""
    max_keys: int = 2048
    """LRU cap on feature keys held; the least recently updated key goes first."""
    bins_per_octave: int = 6
    """Histogram resolution: bins per doubling of length (6 gives ~12% wide bins, interpolated within)."""
    max_tracked_tokens: int = 1 << 17
    """Observed lengths are clipped to [1, this]; bounds the bins per key."""
    max_weight_per_key: float = 2000.0
    """When a key's weight passes this, its counts are halved: an exponential forgetting window."""
    prompt_bins_per_octave: int = 1
    """Prompt-length bucket resolution: 1 buckets prompts by powers of two."""
    backoff: tuple[tuple[str, ...], ...] = DEFAULT_BACKOFF
    """Feature keys from most specific to coarsest; each is a tuple of `FEATURE_NAMES` entries."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.prior_median_tokens) and self.prior_median_tokens >= 1):
            raise ValueError(f"prior_median_tokens must be finite and >= 1, got {self.prior_median_tokens}")
        if not (math.isfinite(self.prior_sigma) and self.prior_sigma >= 0):
            raise ValueError(f"prior_sigma must be finite and >= 0, got {self.prior_sigma}")
        if not (self.min_observations >= 1):
            raise ValueError(f"min_observations must be >= 1, got {self.min_observations}")
        if not (self.max_weight_per_key >= 2 * self.min_observations):
            raise ValueError(
                f"max_weight_per_key ({self.max_weight_per_key}) must be >= 2 * min_observations "
                f"({self.min_observations}) so a halved key still answers"
            )
        for name in ("bins_per_octave", "prompt_bins_per_octave"):
            if not 1 <= getattr(self, name) <= 64:
                raise ValueError(f"{name} must be in [1, 64], got {getattr(self, name)}")
        if self.max_tracked_tokens < 2:
            raise ValueError(f"max_tracked_tokens must be >= 2, got {self.max_tracked_tokens}")
        if not self.backoff:
            raise ValueError("backoff needs at least one level (use ((),) for a global-only predictor)")
        for level in self.backoff:
            unknown = [n for n in level if n not in FEATURE_NAMES]
            if unknown or len(set(level)) != len(level):
                raise ValueError(f"backoff level {level} must use distinct names from {FEATURE_NAMES}")
        if len(set(self.backoff)) != len(self.backoff):
            raise ValueError(f"backoff levels must be distinct, got {self.backoff}")
        if self.max_keys < len(self.backoff):
            raise ValueError(f"max_keys ({self.max_keys}) must be >= the number of backoff levels")


@dataclass(kw_only=True, frozen=True)
class LengthPrediction:
    """Predicted output-length quantiles for one request, already clipped to its max_tokens."""

    p50: float
    """Median output tokens."""
    p90: float
    """90th-percentile output tokens; >= p50."""
    source: str
    """Which key answered, e.g. `deployment=chat|prompt_bucket=7`, `*` for the global key, or `prior`."""
    num_observations: float
    """The answering key's (decayed) observation weight; 0 for the prior."""


@dataclass(kw_only=True, frozen=True)
class LabeledRequest:
    """A request and how many tokens it actually generated, for `evaluate`."""

    request: RouteRequest
    output_len: int
    features: Features | None = None
    """Optional `prompt_features` of the prompt text."""


class LengthModel(Protocol):
    """Anything `evaluate` can score: predicts before it learns, learns from completed requests."""

    def predict(self, request: RouteRequest, features: Features | None = None) -> LengthPrediction:
        """Quantiles for `request`; must not change the model."""
        ...

    def observe(self, request: RouteRequest, output_len: int, features: Features | None = None) -> None:
        """Learn that `request` generated `output_len` tokens."""
        ...


def prompt_features(text: str) -> dict[str, float]:
    """Cheap features of the prompt text, computed once at the router's edge; all values are floats."""
    stripped = text.rstrip()
    visible = sum(1 for c in stripped if not c.isspace())
    lowered = stripped.lower()
    hint = float(any(c in lowered for c in _LONG_CUES)) - float(any(c in lowered for c in _SHORT_CUES))
    return {
        "ends_with_question": float(stripped.endswith("?")),
        "digit_ratio": sum(c.isdigit() for c in stripped) / visible if visible else 0.0,
        "has_code": float("```" in stripped),
        "length_hint": hint,
    }


def shape_signature(features: Features) -> str:
    """A coarse categorical summary of `prompt_features` output, so it can be part of a key."""
    digits = features.get("digit_ratio", 0.0)
    digit_bucket = 0 if digits < 0.05 else 1 if digits < 0.3 else 2
    hint = features.get("length_hint", 0.0)
    hint_bucket = "s" if hint < 0 else "l" if hint > 0 else "n"
    q = int(features.get("ends_with_question", 0.0) > 0.5)
    code = int(features.get("has_code", 0.0) > 0.5)
    return f"q{q}d{digit_bucket}c{code}h{hint_bucket}"


def prompt_bucket(num_prompt_tokens: int, bins_per_octave: int = 1) -> int:
    """Log-scale bucket of a prompt length: floor(log2(n) * bins_per_octave), 0 for n <= 1."""
    return int(math.log2(num_prompt_tokens) * bins_per_octave) if num_prompt_tokens > 1 else 0


class LengthPredictor:
    """Hierarchical-backoff output-length predictor; see the module docstring. Not thread-safe."""

    def __init__(self, config: LengthPredictorConfig | None = None) -> None:
        self.config = config or LengthPredictorConfig()
        self._init_state()

    def _init_state(self) -> None:
        self._keys: OrderedDict[Key, LogHistogram] = OrderedDict()
        z50, z90 = 0.0, NormalDist().inv_cdf(0.9)
        median, sigma = self.config.prior_median_tokens, self.config.prior_sigma
        self._prior = (median * math.exp(sigma * z50), median * math.exp(sigma * z90))

    @property
    def num_keys(self) -> int:
        return len(self._keys)

    def keys_for(self, request: RouteRequest, features: Features | None = None) -> list[Key]:
        """The request's feature keys, most specific first; levels needing absent features are skipped."""
        values = {
            "tenant": request.tenant,
            "deployment": request.deployment,
            "adapter": request.adapter or "-",
            "prompt_bucket": str(prompt_bucket(request.num_prompt_tokens_estimate, self.config.prompt_bins_per_octave)),
        }
        if features is not None:
            values["shape"] = shape_signature(features)
        levels = [level for level in self.config.backoff if all(n in values for n in level)]
        return [tuple((n, values[n]) for n in level) for level in levels]

    def predict(self, request: RouteRequest, features: Features | None = None) -> LengthPrediction:
        """p50/p90 from the most specific key with enough weight, else the prior; clipped to max_tokens."""
        p50, p90 = self._prior
        source, weight = "prior", 0.0
        for key in self.keys_for(request, features):
            histogram = self._keys.get(key)
            if histogram is not None and histogram.total >= self.config.min_observations:
                p50, p90 = histogram.quantiles((0.5, 0.9))
                source, weight = _key_text(key), histogram.total
                break
        cap = float(request.max_tokens) if request.max_tokens > 0 else math.inf
        return LengthPrediction(p50=min(p50, cap), p90=min(max(p90, p50), cap), source=source, num_observations=weight)

    def observe(self, request: RouteRequest, output_len: int, features: Features | None = None) -> None:
        """Learn from a completed request. A request cut off at max_tokens is recorded at that length."""
        if output_len < 0:
            raise ValueError(f"output_len must be >= 0, got {output_len}")
        value = float(min(max(output_len, 1), self.config.max_tracked_tokens))
        for key in self.keys_for(request, features):
            histogram = self._keys.get(key)
            if histogram is None:
                histogram = self._keys[key] = LogHistogram(self.config.bins_per_octave)
            else:
                self._keys.move_to_end(key)
            histogram.add(value)
            if histogram.total > self.config.max_weight_per_key:
                histogram.scale(0.5)
        while len(self._keys) > self.config.max_keys:
            self._keys.popitem(last=False)

    def to_dict(self) -> dict:
        """A JSON-serialisable snapshot: config and every key's bins, oldest key first (LRU order survives)."""
        return {
            "version": SERIAL_VERSION,
            "config": {**asdict(self.config), "backoff": [list(level) for level in self.config.backoff]},
            "keys": [
                {"key": [list(pair) for pair in key], "bins": [[i, c] for i, c in sorted(h.counts.items())]}
                for key, h in self._keys.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LengthPredictor:
        """Rebuild from `to_dict` output; raises ValueError on an unknown version or malformed data."""
        if data.get("version") != SERIAL_VERSION:
            raise ValueError(f"length predictor snapshot version {data.get('version')!r}; expected {SERIAL_VERSION}")
        try:
            raw = dict(data["config"])
            raw["backoff"] = tuple(tuple(level) for level in raw["backoff"])
            predictor = cls(LengthPredictorConfig(**raw))
            for entry in data["keys"]:
                counts = {int(i): float(c) for i, c in entry["bins"]}
                histogram = LogHistogram.from_counts(predictor.config.bins_per_octave, counts)
                predictor._keys[tuple((str(n), str(v)) for n, v in entry["key"])] = histogram
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed length predictor snapshot: {exc!r}") from None
        return predictor


def _key_text(key: Key) -> str:
    return "|".join(f"{n}={v}" for n, v in key) or "*"


def evaluate(predictor: LengthModel, samples: Sequence[LabeledRequest], *, learn: bool = False) -> dict[str, float]:
    """Kendall's tau-b of p50 vs actual, MAE of p50, and the fraction of actuals at or under p90.

    With `learn`, each sample is observed right after it is predicted (prequential, test-then-train);
    otherwise the predictor is left untouched. tau is NaN when either side is constant.
    """
    if not samples:
        raise ValueError("evaluate needs at least one sample")
    p50s: list[float] = []
    covered = 0
    for sample in samples:
        prediction = predictor.predict(sample.request, sample.features)
        p50s.append(prediction.p50)
        covered += sample.output_len <= prediction.p90
        if learn:
            predictor.observe(sample.request, sample.output_len, sample.features)
    actuals = [s.output_len for s in samples]
    return {
        "kendall_tau": kendall_tau_b(p50s, actuals),
        "mae": math.fsum(abs(p - a) for p, a in zip(p50s, actuals, strict=True)) / len(samples),
        "coverage_p90": covered / len(samples),
    }


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (tie-corrected rank correlation) in O(n log n); NaN when undefined.

    Sort by (x, y), count tied groups, then count discordant pairs as the inversions a merge sort of
    the y column removes: tau_b = (n0 - tx - ty + txy - 2 * inversions) / sqrt((n0 - tx) * (n0 - ty)).
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return math.nan
    pairs = sorted(zip(x, y, strict=True))
    n0 = n * (n - 1) // 2
    tied_x = _tied_pairs([p[0] for p in pairs])
    tied_xy = _tied_pairs(pairs)
    ys = [p[1] for p in pairs]
    inversions = _count_inversions(ys)  # sorts ys in place
    tied_y = _tied_pairs(ys)
    denominator = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    if denominator == 0:
        return math.nan
    return (n0 - tied_x - tied_y + tied_xy - 2 * inversions) / denominator


def _tied_pairs(ordered: Sequence) -> int:
    """Pairs of equal neighbours-in-runs in an already sorted sequence: sum of t(t-1)/2 over runs."""
    total, run = 0, 1
    for prev, cur in itertools.pairwise(ordered):
        if cur == prev:
            run += 1
        else:
            total += run * (run - 1) // 2
            run = 1
    return total + run * (run - 1) // 2


def _count_inversions(values: list) -> int:
    """Pairs i < j with values[i] > values[j]; bottom-up merge sort, sorting `values` in place."""
    n = len(values)
    inversions, width = 0, 1
    buffer = list(values)
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if values[j] < values[i]:
                    buffer[k] = values[j]
                    inversions += mid - i  # every remaining left element is greater
                    j += 1
                else:
                    buffer[k] = values[i]
                    i += 1
                k += 1
            buffer[k : k + mid - i] = values[i:mid]
            k += mid - i
            buffer[k : k + hi - j] = values[j:hi]
        values[:] = buffer
        width *= 2
    return inversions

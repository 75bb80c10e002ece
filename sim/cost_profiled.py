"""A cost model fitted to measured step times of our own engine on the machine at hand.

Form (DistServe-like, one linear model for mixed steps):

    t = a + b * num_prefill_tokens + c * prefill_attn_work + d * num_decodes + e * decode_context_sum

fitted by non-negative least squares on relative error (every shape counts alike, from a
2 ms decode step to a 60 ms prefill), so it never predicts a negative time and stays sane
outside the grid it was measured on. `sim/profile.py` measures the samples and writes the
JSON this module loads; `raylane sim profile` runs it.

Several worker processes can share the machine's cores (4 workers on 2 cores in the
validation cluster), so the file also holds a measured CPU-sharing factor: how much one
engine's step stretches while `k` engines step at once. The simulator multiplies a step's
time by `contention(num_busy_workers)`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.cost import StepShape

__all__ = [
    "FEATURES",
    "FitReport",
    "ProfiledCostModel",
    "ServingSample",
    "fit_serving",
    "fit_step_times",
    "shape_features",
]

FEATURES = ("intercept", "num_prefill_tokens", "prefill_attn_work", "num_decodes", "decode_context_sum")
"""Names of the fitted coefficients, in the order of `shape_features`."""
FORMAT_VERSION = 1


def shape_features(shape: StepShape) -> tuple[float, ...]:
    """The regressors of one step, in `FEATURES` order."""
    return (
        1.0,
        float(shape.num_prefill_tokens),
        float(shape.prefill_attn_work),
        float(shape.num_decodes),
        float(shape.decode_context_sum),
    )


@dataclass(kw_only=True, frozen=True)
class FitReport:
    """How well the linear form explains the measurements."""

    num_train: int
    """Shapes the coefficients were fitted on."""
    num_heldout: int
    """Shapes kept out of the fit and used only to score it."""
    r2: float
    """Coefficient of determination on the training shapes (1 is perfect)."""
    train_mean_rel_error: float
    """Mean |predicted - measured| / measured on the training shapes."""
    heldout_mean_rel_error: float
    """The same on the held-out shapes; NaN when none were held out."""
    heldout_max_rel_error: float
    """The worst held-out shape's relative error; NaN when none were held out."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


def fit_step_times(
    shapes: Sequence[StepShape], times_s: Sequence[float], *, heldout: Sequence[bool] | None = None
) -> tuple[dict[str, float], FitReport]:
    """Fit the coefficients to measured `(shape, seconds)` pairs; `heldout[i]` keeps pair i out of the fit.

    Minimises the squared relative error under non-negative coefficients. Raises ValueError when
    the pairs cannot pin down the model (too few, non-positive times, mismatched lengths).
    """
    import numpy as np
    from scipy.optimize import nnls

    if len(shapes) != len(times_s):
        raise ValueError(f"got {len(shapes)} shapes but {len(times_s)} times")
    mask = np.zeros(len(shapes), dtype=bool) if heldout is None else np.asarray(heldout, dtype=bool)
    if mask.shape != (len(shapes),):
        raise ValueError(f"heldout must have one flag per shape ({len(shapes)}), got {mask.shape[0]}")
    times = np.asarray(times_s, dtype=float)
    if len(times) and times.min() <= 0:
        raise ValueError("every measured step time must be positive")
    features = np.array([shape_features(s) for s in shapes], dtype=float).reshape(len(shapes), len(FEATURES))
    train = ~mask
    if train.sum() < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} training shapes to fit {len(FEATURES)} coefficients")
    # Columns span 1 to ~1e5; scale them to unit size so NNLS is well conditioned.
    scale = np.maximum(np.abs(features[train]).max(axis=0), 1.0)
    weights = 1.0 / times[train]
    solution, _ = nnls(features[train] / scale * weights[:, None], times[train] * weights)
    coeffs = solution / scale
    predicted = features @ coeffs
    rel = np.abs(predicted - times) / times
    residual = ((predicted[train] - times[train]) ** 2).sum()
    spread = ((times[train] - times[train].mean()) ** 2).sum()
    report = FitReport(
        num_train=int(train.sum()),
        num_heldout=int(mask.sum()),
        r2=float(1.0 - residual / spread) if spread > 0 else 1.0,
        train_mean_rel_error=float(rel[train].mean()),
        heldout_mean_rel_error=float(rel[mask].mean()) if mask.any() else math.nan,
        heldout_max_rel_error=float(rel[mask].max()) if mask.any() else math.nan,
    )
    return dict(zip(FEATURES, (float(c) for c in coeffs), strict=True)), report


@dataclass(kw_only=True, frozen=True)
class ProfiledCostModel:
    """Step times of one engine on one machine, from a fit of measured steps (see the module docstring)."""

    coefficients: Mapping[str, float]
    """Seconds per unit of each of `FEATURES` (`intercept` in plain seconds)."""
    contention_factors: Mapping[int, float] = field(default_factory=lambda: {1: 1.0})
    """Measured stretch of a step while k engines step at once (k -> factor, 1 -> 1.0)."""
    serving_overhead: Mapping[str, float] = field(default_factory=dict)
    """Extra seconds per step of the serving path around the engine (Ray streaming, router, client):
    `intercept` per step and `num_decodes` per streamed token; empty for an engine-only profile."""
    request_overhead_s: float = 0.0
    """Seconds from a client's send to the request reaching its worker (router, Ray call); 0 engine-only."""
    name: str = "profiled"
    """Shown in simulator output."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Where the profile came from (machine, model, engine config, fit quality); not used to predict."""

    def __post_init__(self) -> None:
        missing = [f for f in FEATURES if f not in self.coefficients]
        if missing:
            raise ValueError(f"profiled cost model is missing coefficients {missing}; expected {list(FEATURES)}")
        bad = {k: v for k, v in self.coefficients.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"coefficients must be finite and >= 0, got {bad}")
        factors = {int(k): float(v) for k, v in self.contention_factors.items()}
        if not factors or min(factors) < 1 or any(not (math.isfinite(v) and v > 0) for v in factors.values()):
            raise ValueError(f"contention factors need keys >= 1 and positive values, got {factors}")
        object.__setattr__(self, "contention_factors", dict(sorted(factors.items())))
        unknown = set(self.serving_overhead) - {"intercept", "num_decodes"}
        if unknown or any(not (math.isfinite(v) and v >= 0) for v in self.serving_overhead.values()):
            raise ValueError(
                f"serving_overhead takes intercept and num_decodes >= 0, got {dict(self.serving_overhead)}"
            )
        if not (math.isfinite(self.request_overhead_s) and self.request_overhead_s >= 0):
            raise ValueError(f"request_overhead_s must be >= 0, got {self.request_overhead_s}")

    # ---- CostModel --------------------------------------------------------------------------

    def step_time_s(self, shape: StepShape) -> float:
        """Seconds of one step on an otherwise idle machine (engine plus serving path, when profiled)."""
        c = self.coefficients
        serving = self.serving_overhead
        return (
            c["intercept"]
            + serving.get("intercept", 0.0)
            + serving.get("num_decodes", 0.0) * shape.num_decodes
            + c["num_prefill_tokens"] * shape.num_prefill_tokens
            + c["prefill_attn_work"] * shape.prefill_attn_work
            + c["num_decodes"] * shape.num_decodes
            + c["decode_context_sum"] * shape.decode_context_sum
        )

    def decode_run_time_s(self, num_decodes: int, context_sum: int, num_steps: int) -> float:
        """Closed form of `num_steps` pure-decode steps; every context grows by one token per step."""
        if num_steps <= 0:
            return 0.0
        first = self.step_time_s(StepShape(num_decodes=num_decodes, decode_context_sum=context_sum))
        growth = self.coefficients["decode_context_sum"] * num_decodes
        return num_steps * first + growth * num_steps * (num_steps - 1) / 2

    def contention(self, num_busy_workers: int) -> float:
        """Stretch of a step while `num_busy_workers` engines (this one included) are stepping.

        Interpolates the measured factors linearly; past the last measured count it grows in
        proportion to the count (time-slicing more processes over the same cores). A profile that
        measured no sharing (only k=1) never stretches.
        """
        if num_busy_workers <= 1 or len(self.contention_factors) < 2:
            return 1.0
        factors = self.contention_factors
        if num_busy_workers in factors:
            return factors[num_busy_workers]
        counts = sorted(factors)
        if num_busy_workers > counts[-1]:
            return factors[counts[-1]] * num_busy_workers / counts[-1]
        below = max([k for k in counts if k < num_busy_workers], default=1)
        above = min(k for k in counts if k > num_busy_workers)
        low = factors.get(below, 1.0)
        frac = (num_busy_workers - below) / (above - below)
        return low + (factors[above] - low) * frac

    # ---- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "profiled",
            "name": self.name,
            "form": "t = contention(busy workers) * (intercept + sum_f coefficients[f] * f"
            " + serving_overhead.intercept + serving_overhead.num_decodes * num_decodes)",
            "coefficients": dict(self.coefficients),
            "contention": {str(k): v for k, v in self.contention_factors.items()},
            "serving_overhead": dict(self.serving_overhead),
            "request_overhead_s": self.request_overhead_s,
            "metadata": dict(self.metadata),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfiledCostModel:
        if data.get("kind") != "profiled":
            raise ValueError(
                f"not a profiled cost model (kind={data.get('kind')!r}); make one with raylane sim profile"
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"profile format_version {data.get('format_version')!r}; this raylane reads {FORMAT_VERSION}"
            )
        return cls(
            coefficients={k: float(v) for k, v in data["coefficients"].items()},
            contention_factors={int(k): float(v) for k, v in (data.get("contention") or {"1": 1.0}).items()},
            serving_overhead={k: float(v) for k, v in (data.get("serving_overhead") or {}).items()},
            request_overhead_s=float(data.get("request_overhead_s", 0.0)),
            name=str(data.get("name", "profiled")),
            metadata=dict(data.get("metadata") or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> ProfiledCostModel:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"profile {path} not found; make one with `raylane sim profile --out {path}`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


@dataclass(kw_only=True, frozen=True)
class ServingSample:
    """A closed-loop burst through the real serving path: `num_workers` x `batch_size` equal requests at once."""

    num_workers: int
    """Workers in the pool, all busy (the router spreads the burst evenly)."""
    batch_size: float
    """Requests per worker: exact for a burst, the Little's-law mean for an open-loop run."""
    prompt_len: int
    """Prompt tokens of every request."""
    output_len: int
    """Output tokens of every request."""
    tpot_s: float
    """Median time per output token the clients saw."""
    ttft_s: float
    """Median time to first token the clients saw."""
    is_open_loop: bool = False
    """Poisson arrivals (requests start and finish all the time, as in serving) rather than one burst."""


def fit_serving(model: ProfiledCostModel, samples: Sequence[ServingSample]) -> ProfiledCostModel:
    """Add the serving path and CPU sharing, measured on a real cluster, to an engine-only profile.

    One worker's bursts pin the per-step and per-token overhead: the clients' TPOT minus the
    engine's decode step, fitted linearly in the batch size. Each larger pool gives the contention
    factor: its TPOT over what one worker would take at that batch, median over its open-loop
    samples (or its bursts when it has none). The
    request overhead is the one-request TTFT minus the served prefill step.
    """
    import numpy as np
    from scipy.optimize import nnls

    solo = sorted((s for s in samples if s.num_workers == 1 and not s.is_open_loop), key=lambda s: s.batch_size)
    if len({s.batch_size for s in solo}) < 2:
        raise ValueError("fit_serving needs one-worker samples at two or more batch sizes")
    engine = ProfiledCostModel(coefficients=model.coefficients, metadata=model.metadata)

    def decode_shape(s: ServingSample) -> StepShape:
        # Contexts grow from the prompt to prompt + output while the burst decodes: take the middle.
        mid_context = s.prompt_len + s.output_len // 2
        return StepShape(num_decodes=s.batch_size, decode_context_sum=s.batch_size * mid_context)

    extra = np.array([max(0.0, s.tpot_s - engine.step_time_s(decode_shape(s))) for s in solo])
    batch = np.array([float(s.batch_size) for s in solo])
    # Relative least squares, as the engine fit: a 3 ms and a 30 ms TPOT count alike.
    weights = 1.0 / np.maximum(extra, 1e-4)
    (per_step, per_token), _ = nnls(np.stack([np.ones_like(batch), batch], axis=1) * weights[:, None], extra * weights)
    serving = {"intercept": float(per_step), "num_decodes": float(per_token)}
    served = ProfiledCostModel(coefficients=model.coefficients, serving_overhead=serving)
    factors: dict[int, float] = {1: 1.0}
    for k in sorted({s.num_workers for s in samples} - {1}):
        at_k = [s for s in samples if s.num_workers == k]
        # Open-loop runs look like serving (requests join and leave between steps); prefer them to bursts.
        at_k = [s for s in at_k if s.is_open_loop] or at_k
        factors[k] = max(1.0, statistics.median(s.tpot_s / served.step_time_s(decode_shape(s)) for s in at_k))
    single = min(solo, key=lambda s: s.batch_size)
    prefill = StepShape(num_prefill_tokens=single.prompt_len, prefill_attn_work=single.prompt_len**2)
    request_overhead = max(0.0, single.ttft_s - served.step_time_s(prefill))
    return ProfiledCostModel(
        coefficients=model.coefficients,
        contention_factors=factors,
        serving_overhead=serving,
        request_overhead_s=request_overhead,
        name="profiled+serving",
        metadata={
            **model.metadata,
            "engine_contention": {str(k): v for k, v in model.contention_factors.items()},
            "serving_samples": [s.__dict__ for s in samples],
        },
    )

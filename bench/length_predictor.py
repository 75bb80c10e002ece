"""Output-length prediction on the Azure LLM trace: the hierarchical predictor against two online baselines.

Every request of the trace (Azure/AzurePublicDataset, conversation 2023, CC-BY 4.0; Splitwise, ISCA 2024)
is replayed in arrival order. Each predictor predicts a request before it learns that request's true
output length (prequential, test-then-train). The first `--train-fraction` of the trace is warm-up; the
metrics that count are those on the tail, which every predictor sees only after the warm-up.

The trace has no text, tenant or deployment, so the only feature is the prompt length (its log2 bucket);
`max_tokens` is a generous 4096 for every request. Predictors, all online, all in one run:

  hierarchical    router.length_predictor.LengthPredictor, default config
  global_median   the same class with a single global key: running global p50 and p90 (the baseline)
  linear_prompt   least squares of output on prompt length, fit online; p90 adds the running p90 residual

Metrics per predictor: Kendall's tau-b of predicted p50 vs actual (ranking quality, what a
shortest-job-first scheduler needs), MAE of p50 in tokens, and p90 coverage (fraction of actuals <= p90;
0.9 is calibrated). Ratios compare each with `global_median`.

    python bench/length_predictor.py
    python bench/length_predictor.py --train-fraction 0.5 --freeze-tail

stdout is exactly one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from router.length_predictor import (  # noqa: E402
    Features,
    LabeledRequest,
    LengthModel,
    LengthPrediction,
    LengthPredictor,
    LengthPredictorConfig,
    evaluate,
)
from router.policy import RouteRequest  # noqa: E402
from router.trace import DEFAULT_TRACE, load_trace  # noqa: E402

BASELINE = "global_median"


def log(msg: str) -> None:
    print(f"[length_predictor] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure trace CSV (default: data/traces)")
    parser.add_argument(
        "--train-fraction", type=float, default=0.8, help="leading share of the trace used as warm-up (default 0.8)"
    )
    parser.add_argument("--max-tokens", type=int, default=4096, help="max_tokens of every request (default 4096)")
    parser.add_argument("--num-requests", type=int, default=0, help="use only the first N requests (default: all)")
    parser.add_argument(
        "--freeze-tail", action="store_true", help="stop learning after the warm-up (default: keep test-then-train)"
    )
    parser.add_argument(
        "--prompt-bins-per-octave", type=int, default=1, help="prompt-length buckets per doubling (default 1)"
    )
    parser.add_argument(
        "--residual-window", type=int, default=2000, help="residuals the linear baseline keeps for its p90"
    )
    args = parser.parse_args(argv)
    if not 0.0 < args.train_fraction < 1.0 or args.max_tokens < 1 or args.num_requests < 0:
        parser.error("need 0 < --train-fraction < 1, --max-tokens >= 1 and --num-requests >= 0")
    if args.residual_window < 10:
        parser.error("--residual-window must be >= 10")
    return args


class OnlineLinearPredictor:
    """Ordinary least squares of output length on prompt length from running sums; p90 = p50 + p90 residual."""

    def __init__(self, *, residual_window: int, prior_tokens: float = 256.0) -> None:
        self.prior_tokens = prior_tokens
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self._window: deque[float] = deque(maxlen=residual_window)
        self._sorted: list[float] = []

    def _mean_at(self, x: float) -> float:
        variance = self.n * self.sxx - self.sx * self.sx
        if self.n < 2 or variance <= 0:
            return self.sy / self.n if self.n else self.prior_tokens
        slope = (self.n * self.sxy - self.sx * self.sy) / variance
        return (self.sy - slope * self.sx) / self.n + slope * x

    def predict(self, request: RouteRequest, features: Features | None = None) -> LengthPrediction:
        cap = float(request.max_tokens)
        p50 = min(cap, max(1.0, self._mean_at(request.num_prompt_tokens_estimate)))
        residual = self._sorted[int(0.9 * (len(self._sorted) - 1))] if self._sorted else p50 * 2.6
        p90 = min(cap, max(p50, p50 + residual))
        return LengthPrediction(p50=p50, p90=p90, source="linear", num_observations=self.n)

    def observe(self, request: RouteRequest, output_len: int, features: Features | None = None) -> None:
        residual = output_len - min(
            float(request.max_tokens), max(1.0, self._mean_at(request.num_prompt_tokens_estimate))
        )
        if len(self._window) == self._window.maxlen:
            old = self._window[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._window.append(residual)
        bisect.insort(self._sorted, residual)
        x, y = float(request.num_prompt_tokens_estimate), float(output_len)
        self.n += 1
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.sxy += x * y


def to_samples(trace, max_tokens: int) -> list[LabeledRequest]:
    return [
        LabeledRequest(
            request=RouteRequest(
                request_id=str(i),
                deployment="conv",
                tenant="azure",
                num_prompt_tokens_estimate=r.prompt_len,
                max_tokens=max_tokens,
            ),
            output_len=min(r.output_len, max_tokens),
        )
        for i, r in enumerate(trace)
    ]


def rounded(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: None if math.isnan(v) else round(v, 4) for k, v in metrics.items()}


def ratio(value: float, base: float) -> float | None:
    return None if math.isnan(value) or math.isnan(base) or base == 0 else round(value / base, 4)


def run(args: argparse.Namespace) -> dict:
    trace = load_trace(args.trace)
    if args.num_requests:
        trace = trace[: args.num_requests]
    samples = to_samples(trace, args.max_tokens)
    num_train = int(len(samples) * args.train_fraction)
    warmup, holdout = samples[:num_train], samples[num_train:]
    if not warmup or not holdout:
        raise ValueError(f"{len(samples)} requests leave an empty warm-up or tail at --train-fraction")
    models: dict[str, LengthModel] = {
        "hierarchical": LengthPredictor(LengthPredictorConfig(prompt_bins_per_octave=args.prompt_bins_per_octave)),
        BASELINE: LengthPredictor(LengthPredictorConfig(backoff=((),))),
        "linear_prompt": OnlineLinearPredictor(residual_window=args.residual_window),
    }
    results: dict[str, dict] = {}
    for name, model in models.items():
        start = time.perf_counter()
        train_metrics = evaluate(model, warmup, learn=True)
        holdout_metrics = evaluate(model, holdout, learn=not args.freeze_tail)
        elapsed = time.perf_counter() - start
        results[name] = {
            "holdout": rounded(holdout_metrics),
            "warmup_prequential": rounded(train_metrics),
            "us_per_request": round(elapsed / len(samples) * 1e6, 2),
        }
        log(f"{name}: holdout {results[name]['holdout']}")
    base = results[BASELINE]["holdout"]
    vs_baseline = {}
    for name, result in results.items():
        held = result["holdout"]
        # tau is None (undefined) for a predictor that never changed its answer; a ratio of taus means nothing.
        taus = (held["kendall_tau"], base["kendall_tau"])
        vs_baseline[name] = {
            "mae_ratio": ratio(held["mae"], base["mae"]),
            "coverage_p90_ratio": ratio(held["coverage_p90"], base["coverage_p90"]),
            "kendall_tau_minus_baseline": None if None in taus else round(taus[0] - taus[1], 4),
        }
    hierarchical = models["hierarchical"]
    assert isinstance(hierarchical, LengthPredictor)
    return {
        "bench": "length_predictor",
        "trace": args.trace.name,
        "credit": "Azure/AzurePublicDataset (CC-BY 4.0); Patel et al., Splitwise, ISCA 2024",
        "protocol": "arrival order, predict then learn; metrics on the tail after the warm-up"
        + (", no learning on the tail" if args.freeze_tail else ", still learning on the tail"),
        "features": ["prompt_bucket"],
        "prompt_bins_per_octave": args.prompt_bins_per_octave,
        "max_tokens": args.max_tokens,
        "num_requests": len(samples),
        "num_warmup": len(warmup),
        "num_holdout": len(holdout),
        "baseline": BASELINE,
        "predictors": results,
        "vs_baseline": vs_baseline,
        "hierarchical_state": {
            "num_keys": hierarchical.num_keys,
            "json_bytes": len(json.dumps(hierarchical.to_dict())),
        },
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()

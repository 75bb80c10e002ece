"""The cost-model contract: how long one engine iteration takes.

A cost model maps the shape of one continuous-batching step (chunked prefill plus
decodes) to seconds. The simulator only ever talks to this protocol, so the
roofline model (`sim/cost_roofline.py`) and the profiled model of this machine
(`sim/cost_profiled.py`) are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["CostModel", "LinearCostModel", "StepShape", "decode_run_time_s"]


@dataclass(frozen=True, slots=True)
class StepShape:
    """One engine iteration (continuous batching with chunked prefill)."""

    num_prefill_tokens: int = 0
    """Prompt tokens computed this step, all chunks together."""
    prefill_attn_work: int = 0
    """Sum over chunks of chunk_len * (tokens already in that request's context + chunk_len)."""
    num_decodes: int = 0
    """Decode requests in the batch (one token each)."""
    decode_context_sum: int = 0
    """Sum of those requests' context lengths."""


@runtime_checkable
class CostModel(Protocol):
    """Seconds per engine step.

    Implementations must be pure (same shape, same answer) and non-negative.
    They may also define ``decode_run_time_s(num_decodes, context_sum, num_steps)``:
    the summed time of ``num_steps`` consecutive pure-decode steps whose batch does not
    change (each step every context grows by one token). The simulator uses it to
    fast-forward and falls back to summing ``step_time_s`` when it is absent.
    """

    name: str

    def step_time_s(self, shape: StepShape) -> float:
        """Wall time of one step with this shape, in seconds."""
        ...


def decode_run_time_s(model: CostModel, num_decodes: int, context_sum: int, num_steps: int) -> float:
    """Summed time of `num_steps` pure-decode steps starting at `context_sum`.

    Uses the model's closed form when it has one; otherwise, if the model is affine in
    `decode_context_sum` (checked at three points), sums the arithmetic series exactly;
    otherwise sums step by step.
    """
    if num_steps <= 0:
        return 0.0
    closed_form = getattr(model, "decode_run_time_s", None)
    if closed_form is not None:
        return float(closed_form(num_decodes, context_sum, num_steps))
    step = model.step_time_s
    first = step(StepShape(num_decodes=num_decodes, decode_context_sum=context_sum))
    if num_steps == 1:
        return first
    growth = num_decodes * (num_steps - 1)
    last = step(StepShape(num_decodes=num_decodes, decode_context_sum=context_sum + growth))
    half = growth // 2
    middle = step(StepShape(num_decodes=num_decodes, decode_context_sum=context_sum + half))
    expected_middle = first + (last - first) * (half / growth if growth else 0.0)
    # Affine in the context sum -> the mean of first and last is exact.
    if abs(expected_middle - middle) <= 1e-9 * max(1.0, abs(middle)):
        return (first + last) / 2 * num_steps
    return sum(
        step(StepShape(num_decodes=num_decodes, decode_context_sum=context_sum + k * num_decodes))
        for k in range(num_steps)
    )


@dataclass(frozen=True, slots=True)
class LinearCostModel:
    """t = a + b*prefill_tokens + c*prefill_attn_work + d*num_decodes + e*decode_context_sum (seconds).

    The same affine form as the profiled model's default; with hand-picked coefficients it makes tests exact.
    """

    a: float = 0.0
    """Fixed seconds per step."""
    b: float = 0.0
    """Seconds per prompt token."""
    c: float = 0.0
    """Seconds per unit of prefill attention work."""
    d: float = 0.0
    """Seconds per decode request."""
    e: float = 0.0
    """Seconds per token of decode context."""
    name: str = "linear"
    """Shown in results."""

    def __post_init__(self) -> None:
        if min(self.a, self.b, self.c, self.d, self.e) < 0:
            raise ValueError(f"linear cost coefficients must be >= 0, got {self}")

    def step_time_s(self, shape: StepShape) -> float:
        return (
            self.a
            + self.b * shape.num_prefill_tokens
            + self.c * shape.prefill_attn_work
            + self.d * shape.num_decodes
            + self.e * shape.decode_context_sum
        )

    def decode_run_time_s(self, num_decodes: int, context_sum: int, num_steps: int) -> float:
        if num_steps <= 0:
            return 0.0
        per_step = self.a + self.d * num_decodes + self.e * context_sum
        return num_steps * per_step + self.e * num_decodes * num_steps * (num_steps - 1) / 2

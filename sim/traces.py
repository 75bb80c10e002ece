"""Request traces for the simulator: Azure 2023 and BurstGPT CSVs, Mooncake JSONL, rate scaling, time slicing,
synthetic load.

Every loader returns `TraceRequest`s (the router's type, `router/trace.py`) sorted by arrival, times in seconds
from the first row. Mooncake rows carry their prompts' block hash ids; every reshaping here keeps them.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, replace
from pathlib import Path

from router.trace import TraceRequest, is_mooncake, load_mooncake, load_trace

__all__ = [
    "SyntheticTrace",
    "TraceRequest",
    "load_any",
    "load_azure",
    "load_burstgpt",
    "load_mooncake",
    "overlay",
    "scale_rate",
    "slice_time",
]

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


def load_azure(path: str | Path) -> list[TraceRequest]:
    """Azure LLM inference trace 2023 (`TIMESTAMP,ContextTokens,GeneratedTokens`)."""
    return load_trace(path)


def load_burstgpt(path: str | Path, *, model: str | None = None, drop_failures: bool = True) -> list[TraceRequest]:
    """BurstGPT (`Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`), seconds in `Timestamp`.

    `model` keeps only rows of that model (e.g. `ChatGPT`); rows with 0 response tokens are failed requests
    in BurstGPT and are dropped unless `drop_failures` is False.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {path} not found")
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BURSTGPT_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} is not a BurstGPT CSV: missing columns {missing}")
        for row in reader:
            if model is not None and row.get("Model") != model:
                continue
            output_len = int(float(row["Response tokens"]))
            if drop_failures and output_len <= 0:
                continue
            rows.append((float(row["Timestamp"]), max(int(float(row["Request tokens"])), 1), max(output_len, 1)))
    if not rows:
        raise ValueError(f"trace {path} has no usable rows")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    return [TraceRequest(arrival_s=t - start, prompt_len=p, output_len=o) for t, p, o in rows]


def load_any(path: str | Path) -> list[TraceRequest]:
    """Pick the parser from the file: Mooncake JSONL by its first line's keys, else the CSV header."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {path} not found")
    if is_mooncake(path):
        return load_mooncake(path)
    with path.open(newline="") as f:
        header = next(csv.reader(f), [])
    if all(c in header for c in AZURE_COLUMNS):
        return load_azure(path)
    if all(c in header for c in BURSTGPT_COLUMNS):
        return load_burstgpt(path)
    raise ValueError(
        f"{path}: unknown trace format, header {header}; expected Azure 2023 or BurstGPT columns, or Mooncake JSONL"
    )


def scale_rate(requests: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """Arrival rate times `factor` (inter-arrival gaps divided by it); lengths unchanged."""
    if not factor > 0:
        raise ValueError(f"rate factor must be > 0, got {factor}")
    return [replace(r, arrival_s=r.arrival_s / factor) for r in requests]


def slice_time(
    requests: list[TraceRequest], start_s: float = 0.0, duration_s: float | None = None
) -> list[TraceRequest]:
    """Requests arriving in [start_s, start_s + duration_s), re-based to start at 0."""
    if start_s < 0 or (duration_s is not None and duration_s <= 0):
        raise ValueError(f"need start_s >= 0 and duration_s > 0, got {start_s}, {duration_s}")
    end = float("inf") if duration_s is None else start_s + duration_s
    return [replace(r, arrival_s=r.arrival_s - start_s) for r in requests if start_s <= r.arrival_s < end]


def overlay(
    requests: list[TraceRequest], copies: int, *, seed: int = 0, window: tuple[float, float] | None = None
) -> list[TraceRequest]:
    """`copies` copies of the trace merged, each rotated in time by a seeded random offset.

    Multiplies the arrival rate by `copies` over the trace's own span (unlike `scale_rate`, which shortens the
    span), keeping its length distribution. `window` = (start, end) keeps only arrivals in [start, end),
    which saves building requests a slice would drop.

    Copy k's block hash ids are shifted by k x (largest id + 1): copies share no prefix the trace did not have,
    so an overlay multiplies load but keeps the trace's prefix reuse per request.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if copies == 1 or not requests:
        return list(requests)
    span = requests[-1].arrival_s + (requests[-1].arrival_s - requests[0].arrival_s) / max(len(requests) - 1, 1)
    start, end = window if window is not None else (0.0, float("inf"))
    rng = random.Random(seed)
    id_stride = 1 + max((max(r.block_hash_ids) for r in requests if r.block_hash_ids), default=-1)
    merged = [(r.arrival_s, i, 0) for i, r in enumerate(requests) if start <= r.arrival_s < end]
    for copy in range(1, copies):
        shift = rng.uniform(0, span)
        for i, r in enumerate(requests):
            t = (r.arrival_s + shift) % span
            if start <= t < end:
                merged.append((t, i, copy))
    merged.sort()
    out = []
    for t, i, copy in merged:
        r = requests[i]
        ids = tuple(h + copy * id_stride for h in r.block_hash_ids) if copy and r.block_hash_ids else r.block_hash_ids
        out.append(replace(r, arrival_s=t, block_hash_ids=ids))
    return out


@dataclass(kw_only=True, frozen=True)
class SyntheticTrace:
    """Gamma-process arrivals (Poisson when `cv` is 1) with log-normal prompt and output lengths."""

    rate_per_s: float
    """Mean arrivals per second."""
    duration_s: float
    """Length of the trace."""
    cv: float = 1.0
    """Coefficient of variation of inter-arrival gaps: 1 is Poisson, > 1 burstier."""
    prompt_median: float = 1024.0
    """Median prompt tokens."""
    prompt_sigma: float = 1.0
    """Log-space spread of prompt lengths."""
    output_median: float = 128.0
    """Median output tokens."""
    output_sigma: float = 1.0
    """Log-space spread of output lengths."""
    max_len: int = 8192
    """Prompt and output lengths are clipped to [1, max_len]."""
    seed: int = 0
    """Seeds the arrival and length streams."""

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and self.duration_s > 0 and self.cv > 0):
            raise ValueError("synthetic trace needs rate_per_s, duration_s and cv > 0")
        if self.prompt_median < 1 or self.output_median < 1 or self.max_len < 1:
            raise ValueError("synthetic trace needs medians and max_len >= 1")

    def generate(self) -> list[TraceRequest]:
        rng = random.Random(self.seed)
        shape = 1.0 / (self.cv * self.cv)
        scale = 1.0 / (self.rate_per_s * shape)
        out: list[TraceRequest] = []
        t = rng.gammavariate(shape, scale)
        while t < self.duration_s:
            prompt = min(max(round(rng.lognormvariate(0.0, self.prompt_sigma) * self.prompt_median), 1), self.max_len)
            output = min(max(round(rng.lognormvariate(0.0, self.output_sigma) * self.output_median), 1), self.max_len)
            out.append(TraceRequest(arrival_s=t, prompt_len=prompt, output_len=output))
            t += rng.gammavariate(shape, scale)
        return out

"""Sampling benchmark requests from the Azure LLM inference trace 2023 (conversation).

Credit: Azure/AzurePublicDataset (CC-BY 4.0); P. Patel et al., "Splitwise", ISCA 2024.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_2023_conv.csv"


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    """Seconds after the trace's first row."""
    prompt_len: int
    output_len: int


def load_trace(path: str | Path = DEFAULT_TRACE) -> list[TraceRequest]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {path} not found; pass --trace")
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
            rows.append((stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    start = rows[0][0]
    return [TraceRequest((t - start).total_seconds(), p, o) for t, p, o in rows]


@dataclass(frozen=True)
class Scaling:
    prompt_scale: float
    """Every prompt length is multiplied by this (then rounded, at least 1)."""
    max_output_len: int
    """Output lengths are capped here."""


def fit_to_context(requests: list[TraceRequest], max_model_len: int, max_output_len: int = 512) -> Scaling:
    """One prompt scale for the whole sample so that the longest prompt plus the longest output fits."""
    longest_output = min(max(r.output_len for r in requests), max_output_len)
    room = max_model_len - longest_output - 1
    if room < 1:
        raise ValueError(f"max_model_len={max_model_len} leaves no room for prompts next to {longest_output} outputs")
    longest_prompt = max(r.prompt_len for r in requests)
    return Scaling(prompt_scale=min(1.0, room / longest_prompt), max_output_len=longest_output)


def scale_requests(requests: list[TraceRequest], scaling: Scaling) -> list[TraceRequest]:
    return [
        TraceRequest(
            r.arrival_s,
            max(1, round(r.prompt_len * scaling.prompt_scale)),
            max(1, min(r.output_len, scaling.max_output_len)),
        )
        for r in requests
    ]


def sample_requests(requests: list[TraceRequest], num: int, seed: int) -> list[TraceRequest]:
    if num > len(requests):
        raise ValueError(f"asked for {num} requests but the trace has {len(requests)}")
    picked = random.Random(seed).sample(range(len(requests)), num)
    return [requests[i] for i in sorted(picked)]


def random_prompt(length: int, vocab_size: int, rng: random.Random) -> list[int]:
    """Random token ids, as Azure's own replay does; ids 0-2 (special tokens) are avoided."""
    return [rng.randrange(3, vocab_size) for _ in range(length)]

"""Benchmark requests from the Azure LLM inference trace 2023 (conversation service).

Credit: Azure/AzurePublicDataset (CC-BY 4.0); P. Patel et al., "Splitwise", ISCA 2024.
The trace has no prompt text, so prompts are random token ids of the trace's lengths, as
Azure's own replay does.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

# Shipped in the repository (credit and licence in data/traces/README.md), so a fresh clone needs nothing beside it.
DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure_llm_2023_conv.csv"
# Ids 0-2 are <unk>, <s>, </s> in our tokenizers; a random prompt should not contain them.
NUM_SPECIAL_IDS = 3


@dataclass(kw_only=True, frozen=True)
class TraceRequest:
    """One row of the trace: when it arrived and how long it was."""

    arrival_s: float
    """Seconds after the trace's first row."""
    prompt_len: int
    """Prompt (context) tokens."""
    output_len: int
    """Generated tokens."""


@dataclass(kw_only=True, frozen=True)
class Scaling:
    """How trace lengths are shrunk so every request fits a small model's context."""

    prompt_scale: float
    """Every prompt length is multiplied by this, rounded, and kept at least 1."""
    max_output_len: int
    """Output lengths are capped here."""


def load_trace(path: str | Path = DEFAULT_TRACE) -> list[TraceRequest]:
    """Every row of the trace, with arrival times relative to the first row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"trace {path} not found; pass a trace path (the Azure trace ships in the repository's data/traces/, "
            "which only an editable install, `pip install -e .`, sees by default)"
        )
    rows: list[tuple[datetime, int, int]] = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            # Timestamps carry 7 fractional digits; datetime parses at most 6.
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
            rows.append((stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if not rows:
        raise ValueError(f"trace {path} has no rows")
    start = rows[0][0]
    return [TraceRequest(arrival_s=(stamp - start).total_seconds(), prompt_len=p, output_len=o) for stamp, p, o in rows]


def sample_requests(requests: list[TraceRequest], num_requests: int, *, seed: int) -> list[TraceRequest]:
    """`num_requests` distinct rows chosen uniformly with `seed`, kept in arrival order."""
    if not 1 <= num_requests <= len(requests):
        raise ValueError(f"num_requests must be in [1, {len(requests)}] for this trace, got {num_requests}")
    picked = random.Random(seed).sample(range(len(requests)), num_requests)
    return [requests[i] for i in sorted(picked)]


def fit_to_context(requests: list[TraceRequest], *, max_model_len: int, max_output_len: int = 512) -> Scaling:
    """One prompt scale for the whole sample, so the longest prompt next to the longest output fits.

    A single factor keeps the shape of the length distribution; outputs are capped rather than
    scaled so that the decode work per request stays as in the trace for all but the longest.
    """
    if not requests:
        raise ValueError("no requests to fit")
    if max_output_len < 1:
        raise ValueError(f"max_output_len must be >= 1, got {max_output_len}")
    longest_output = min(max(r.output_len for r in requests), max_output_len)
    room = max_model_len - longest_output
    if room < 1:
        raise ValueError(
            f"max_model_len={max_model_len} leaves no room for prompts next to outputs of {longest_output} tokens; "
            "lower --max-output-len"
        )
    longest_prompt = max(r.prompt_len for r in requests)
    return Scaling(prompt_scale=min(1.0, room / longest_prompt), max_output_len=longest_output)


def scale_requests(requests: list[TraceRequest], scaling: Scaling) -> list[TraceRequest]:
    """Apply `scaling` to every request; lengths stay at least 1."""
    return [
        replace(
            r,
            prompt_len=max(1, round(r.prompt_len * scaling.prompt_scale)),
            output_len=max(1, min(r.output_len, scaling.max_output_len)),
        )
        for r in requests
    ]


def random_prompt(length: int, vocab_size: int, rng: random.Random) -> list[int]:
    """`length` random token ids in [NUM_SPECIAL_IDS, vocab_size)."""
    if vocab_size <= NUM_SPECIAL_IDS:
        raise ValueError(f"vocab_size must exceed {NUM_SPECIAL_IDS}, got {vocab_size}")
    return [rng.randrange(NUM_SPECIAL_IDS, vocab_size) for _ in range(length)]


def scaling_summary(sample: list[TraceRequest], scaled: list[TraceRequest], scaling: Scaling) -> dict:
    """What the scaling did, for the benchmark's JSON: lengths before and after, and how many outputs were capped."""

    def stats(values: list[int]) -> dict[str, float]:
        return {"mean": round(sum(values) / len(values), 1), "max": max(values)}

    return {
        "prompt_scale": round(scaling.prompt_scale, 5),
        "max_output_len": scaling.max_output_len,
        "num_outputs_capped": sum(r.output_len > scaling.max_output_len for r in sample),
        "trace_prompt_len": stats([r.prompt_len for r in sample]),
        "prompt_len": stats([r.prompt_len for r in scaled]),
        "trace_output_len": stats([r.output_len for r in sample]),
        "output_len": stats([r.output_len for r in scaled]),
        "total_output_tokens": sum(r.output_len for r in scaled),
    }

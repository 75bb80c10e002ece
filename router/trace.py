"""Benchmark requests from the Azure LLM inference trace 2023 (conversation service) and Mooncake traces.

Credit: Azure/AzurePublicDataset (CC-BY 4.0); P. Patel et al., "Splitwise", ISCA 2024. Mooncake
(kvcache-ai/Mooncake, Apache-2.0); R. Qin et al., "Mooncake", FAST 2025.
The traces have no prompt text, so prompts are random token ids of the trace's lengths, as
Azure's own replay does; a Mooncake row also names its prompt's blocks (`hash_ids`), and
`trace_prompt` builds prompts that share exactly the prefixes those ids share.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

# Shipped in the repository (credit and licence in data/traces/README.md), so a fresh clone needs nothing beside it.
DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure_llm_2023_conv.csv"
# Ids 0-2 are <unk>, <s>, </s> in our tokenizers; a random prompt should not contain them.
NUM_SPECIAL_IDS = 3
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")
MOONCAKE_BLOCK_SIZE = 512
"""Tokens per `hash_ids` block in Mooncake's published traces."""
TRACE_FORMATS = ("auto", "azure", "mooncake")
HASH_MASK = (1 << 64) - 1


@dataclass(kw_only=True, frozen=True)
class TraceRequest:
    """One row of the trace: when it arrived and how long it was."""

    arrival_s: float
    """Seconds after the trace's first row."""
    prompt_len: int
    """Prompt (context) tokens."""
    output_len: int
    """Generated tokens."""
    block_hash_ids: tuple[int, ...] = ()
    """Ids of the prompt's blocks in order (Mooncake's `hash_ids`; the last may be partial): two requests whose
    leading ids agree share that prefix. Empty: the trace says nothing about prefixes."""
    hash_block_size: int = 0
    """Tokens per block of `block_hash_ids` (512 in Mooncake's traces; less once scaled for a tiny model)."""


@dataclass(kw_only=True, frozen=True)
class Scaling:
    """How trace lengths are shrunk so every request fits a small model's context."""

    prompt_scale: float
    """Every prompt length is multiplied by this, rounded, and kept at least 1."""
    max_output_len: int
    """Output lengths are capped here."""


def load_trace(path: str | Path = DEFAULT_TRACE, *, trace_format: str = "auto") -> list[TraceRequest]:
    """Every row of the trace, with arrival times relative to the first row.

    `trace_format`: `azure` (the 2023 CSV), `mooncake` (JSONL with `hash_ids`) or `auto`, which tells them apart by
    the file's first line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"trace {path} not found; pass a trace path (the Azure trace ships in the repository's data/traces/, "
            "which only an editable install, `pip install -e .`, sees by default)"
        )
    if trace_format not in TRACE_FORMATS:
        raise ValueError(f"trace format must be one of {', '.join(TRACE_FORMATS)}, got {trace_format!r}")
    if trace_format == "mooncake" or (trace_format == "auto" and is_mooncake(path)):
        return load_mooncake(path)
    return _load_azure(path)


def is_mooncake(path: str | Path) -> bool:
    """True when the file's first non-blank line is a JSON object with Mooncake's keys."""
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return False
                return isinstance(row, dict) and all(k in row for k in MOONCAKE_KEYS)
    return False


def load_mooncake(path: str | Path, *, block_size: int = MOONCAKE_BLOCK_SIZE) -> list[TraceRequest]:
    """A Mooncake trace (JSONL: `timestamp` in ms, `input_length`, `output_length`, `hash_ids`), sorted by arrival.

    Any of Mooncake's published traces (synthetic, conversation, tool&agent) has this shape; `block_size` is the
    tokens per hash id (512 in all of them).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {path} not found")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    rows: list[TraceRequest] = []
    with path.open() as f:
        for num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                stamp_ms, ids = float(row["timestamp"]), tuple(int(i) for i in row["hash_ids"])
                prompt_len, output_len = int(row["input_length"]), int(row["output_length"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{num}: not a Mooncake trace row ({e!r}); need keys {MOONCAKE_KEYS}") from e
            rows.append(
                TraceRequest(
                    arrival_s=stamp_ms / 1e3,
                    prompt_len=max(prompt_len, 1),
                    output_len=max(output_len, 1),
                    block_hash_ids=ids,
                    hash_block_size=block_size,
                )
            )
    if not rows:
        raise ValueError(f"trace {path} has no rows")
    rows.sort(key=lambda r: r.arrival_s)
    start = rows[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - start) for r in rows] if start else rows


def _load_azure(path: Path) -> list[TraceRequest]:
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


def scale_hash_blocks(requests: list[TraceRequest], *, block_size: int, max_prompt_len: int) -> list[TraceRequest]:
    """Shrink prefix-carrying requests for a tiny model: every hash block becomes `block_size` tokens.

    A prompt of n trace blocks' worth of tokens becomes n * `block_size` tokens (at least 1), cut to
    `max_prompt_len`; cutting keeps the leading blocks, so requests still share exactly the prefixes they shared
    (up to the cut). Requests without hash ids are returned unchanged.
    """
    if block_size < 1 or max_prompt_len < 1:
        raise ValueError(f"need block_size >= 1 and max_prompt_len >= 1, got {block_size}, {max_prompt_len}")
    out = []
    for r in requests:
        if not r.block_hash_ids:
            out.append(r)
            continue
        length = min(max(1, round(r.prompt_len * block_size / r.hash_block_size)), max_prompt_len)
        ids = r.block_hash_ids[: cdiv(length, block_size)]
        out.append(replace(r, prompt_len=length, block_hash_ids=ids, hash_block_size=block_size))
    return out


def trace_prompt(request: TraceRequest, vocab_size: int, rng: random.Random) -> list[int]:
    """Token ids for `request`: each hash block's tokens are a pure function of its id, so requests whose leading
    ids agree share exactly that prefix; tokens past the ids, and whole prompts without ids, come from `rng`."""
    if not request.block_hash_ids:
        return random_prompt(request.prompt_len, vocab_size, rng)
    size = request.hash_block_size
    if size < 1:
        raise ValueError(f"a request with block_hash_ids needs hash_block_size >= 1, got {size}")
    tokens: list[int] = []
    for block_id in request.block_hash_ids:
        if len(tokens) >= request.prompt_len:
            break
        tokens.extend(random_prompt(size, vocab_size, random.Random(block_id)))
    del tokens[request.prompt_len :]
    tokens.extend(random_prompt(request.prompt_len - len(tokens), vocab_size, rng))
    return tokens


def chain_block_ids(block_ids: Sequence[int]) -> tuple[int, ...]:
    """Chained hashes of a prompt's block ids (hash i covers ids 0..i, as the engine's block hashes cover every
    block before theirs); unsigned 64-bit and the same in every process (ints hash without a seed)."""
    hashes, parent = [], 0
    for block_id in block_ids:
        parent = hash((parent, block_id)) & HASH_MASK
        hashes.append(parent)
    return tuple(hashes)


def prefix_sharing(requests: Sequence[TraceRequest]) -> dict[str, float]:
    """What an unbounded prefix cache could serve: the share of blocks whose whole prefix came earlier."""
    seen: set[int] = set()
    num_blocks = num_repeated = 0
    for r in requests:
        for block_hash in chain_block_ids(r.block_hash_ids):
            num_blocks += 1
            num_repeated += block_hash in seen
            seen.add(block_hash)
    share = round(num_repeated / num_blocks, 4) if num_blocks else 0.0
    return {"num_blocks": num_blocks, "repeated_block_share": share}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


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

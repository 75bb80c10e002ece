"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, and top-n logprobs.

A seeded request draws its token at output index i from a generator seeded by `(seed, i)` alone
(`token_generator`), so a request recomputed or resumed on another worker samples the same tokens
without carrying any RNG state along.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.engine.sampling_params import SamplingParams

_FALLBACK_GENERATOR = torch.Generator().manual_seed(0)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    """Per row: the sampled token's and the top-n tokens' logprobs, or None when not asked for."""


def make_generator(seed: int | None) -> torch.Generator | None:
    """A request's own RNG when it has a seed; None means the sampler's shared one."""
    return None if seed is None else torch.Generator().manual_seed(seed)


_MASK64 = (1 << 64) - 1


def token_generator(seed: int, output_index: int) -> torch.Generator:
    """The generator for a seeded request's token at `output_index`: a function of `(seed, output_index)` only."""
    if output_index < 0:
        raise ValueError(f"output_index must be >= 0, got {output_index}")
    return torch.Generator().manual_seed(_mix(seed, output_index))


def _mix(seed: int, output_index: int) -> int:
    """splitmix64 of the pair, so neighbouring (seed, index) pairs give unrelated streams."""
    x = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + output_index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    # manual_seed takes a non-negative 63-bit value on every platform.
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> SamplerOutput:
    """Pick one token per row of `logits [N, V]` (float32)."""
    token_ids = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows)
        probs = _filtered_probs(logits[rows], [params[i] for i in random_rows])
        for j, i in enumerate(random_rows):
            gen = generators[i] or _FALLBACK_GENERATOR
            token_ids[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    ids = token_ids.tolist()
    logprobs: list[dict[int, float] | None] = [None] * len(ids)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        logprobs_all = torch.log_softmax(logits[wanted], dim=-1)
        for j, i in enumerate(wanted):
            logprobs[i] = _top_logprobs(logprobs_all[j], ids[i], params[i].logprobs or 0)
    return SamplerOutput(token_ids=ids, logprobs=logprobs)


def sample_each(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[SamplerOutput, dict[int, Exception]]:
    """`sample` row by row, for a batch whose `sample` raised: returns the rows that worked and each failed row's
    error, so one request's bad values fail that request alone (its token id is -1)."""
    token_ids: list[int] = []
    logprobs: list[dict[int, float] | None] = []
    failures: dict[int, Exception] = {}
    for i in range(logits.shape[0]):
        try:
            row = sample(logits[i : i + 1], [params[i]], [generators[i]])
        except Exception as exc:  # the caller fails this row's request
            failures[i] = exc
            token_ids.append(-1)
            logprobs.append(None)
            continue
        token_ids.extend(row.token_ids)
        logprobs.extend(row.logprobs)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs), failures


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k and top-p masks, applied to all random rows at once."""
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    logits = logits / temperature[:, None]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k or vocab for p in params])
    ranks = torch.arange(vocab)[None, :]
    drop = ranks >= top_k[:, None]
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
    if (top_p < 1.0).any():
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep a token while the mass before it is below p, so the first token always survives.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    return filtered.softmax(dim=-1)


def _top_logprobs(row: torch.Tensor, token: int, n: int) -> dict[int, float]:
    result = {token: float(row[token])}
    if n:
        values, indices = row.topk(n)
        result.update(zip(indices.tolist(), values.tolist(), strict=True))
    return result

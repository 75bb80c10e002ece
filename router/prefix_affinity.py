"""Prefix-cache-aware routing: send a request where its prompt's leading KV blocks are already cached.

Workers publish, with their stats, the exact set of the stable hashes of their most recently used cached
blocks (`KVCacheManager.cached_block_hashes(limit)`, at most `WorkerConfig.prefix_summary_limit`); the router
keeps each as `WorkerView.prefix_block_hashes`. It hashes the request's prompt with the same chained function
(`prefix_block_hashes`) and counts the leading blocks a worker holds.

Why an exact recent-N set and not a Bloom filter: a false hit sends a request to a worker that then runs the
full prefill, possibly on the busier worker, so exact membership is worth 64 bits a hash; N bounds the size
(4096 hashes = 32 KiB a worker), and taking the blocks least likely to be evicted keeps the summary honest
for the interval until the next report. A Bloom filter (~10 bits a hash at 1% false hits) becomes worth it
only for summaries far larger than that.

The benefit is bounded by load: a worker whose load exceeds the pool's least load by more than
`max_load_gap` gets no credit for its cache, so a hot prefix cannot pile every request onto one worker.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from router.policy import RouteRequest, WorkerView, load_score
from workers.engine.block_manager import prefix_block_hashes

logger = logging.getLogger(__name__)

PoolProvider = Callable[[RouteRequest, WorkerView], Sequence[WorkerView]]
"""The healthy workers competing with `worker` for `request` (its deployment and role), `worker` included."""

SummaryProvider = Callable[[str], "PrefixSummary | None"]
"""Worker id -> its latest published prefix summary, or None when it has not reported one."""

TokenProvider = Callable[[RouteRequest], "Sequence[int] | None"]
"""The request's prompt token ids, or None when the router has only text (no affinity then)."""


@dataclass(kw_only=True, frozen=True)
class PrefixSummary:
    """What one worker's prefix cache holds, as the router sees it."""

    block_size: int
    """Tokens per KV block on that worker; the router hashes prompts with the same block size."""
    hashes: frozenset[int]
    """`stable_block_hash` of cached blocks every lookup can reach (unsigned 64-bit)."""

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


@dataclass(kw_only=True, frozen=True)
class PrefixAffinityConfig:
    """How much a cached prefix counts against load."""

    max_load_gap: float = 2.0
    """A worker whose `load_score` exceeds the pool's least by more than this gets no cache credit; >= 0."""
    min_match_blocks: int = 1
    """Matches shorter than this many blocks count as no match (a one-block hit saves little); >= 1."""
    max_request_blocks: int = 8192
    """Hash at most this many leading blocks of a prompt, to bound the router's work per request; >= 1."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_load_gap) or self.max_load_gap < 0:
            raise ValueError(f"max_load_gap must be finite and >= 0, got {self.max_load_gap}")
        for name in ("min_match_blocks", "max_request_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def longest_prefix_match(request_hashes: Sequence[int], cached: Collection[int]) -> int:
    """How many leading blocks of the request are in `cached` (chained hashes: the first miss ends the prefix)."""
    for i, block_hash in enumerate(request_hashes):
        if block_hash not in cached:
            return i
    return len(request_hashes)


def bounded_miss(
    num_matched: int, num_blocks: int, load: float, min_load: float, config: PrefixAffinityConfig
) -> float:
    """Fraction of the request's blocks the worker must compute, in [0, 1]; 1 when load voids the credit."""
    if num_blocks == 0:
        return 0.0  # nothing cacheable: every worker is alike
    if num_matched < config.min_match_blocks or load - min_load > config.max_load_gap:
        return 1.0
    return 1.0 - num_matched / num_blocks


class PrefixAffinityScorer:
    """`Scorer`: the share of the prompt's cacheable blocks the worker would have to prefill (0 = all cached).

    Workers more than `max_load_gap` above their pool's least load score 1, as if they held nothing. Weight
    it in a `WeightedPolicy` by how many queued requests a whole-prompt hit is worth. `pool=None` drops the
    load bound (for callers that bound load themselves and call `miss` with their pool's least load). By default the
    summaries come from `WorkerView.prefix_block_hashes` and the tokens from `RouteRequest.prompt_token_ids`,
    so the scorer is a pure function of the view; the providers exist for callers that keep them elsewhere.
    """

    name = "prefix"

    def __init__(
        self,
        config: PrefixAffinityConfig | None = None,
        *,
        summaries: SummaryProvider | None = None,
        prompt_tokens: TokenProvider | None = None,
        pool: PoolProvider | None,
    ) -> None:
        self.config = config or PrefixAffinityConfig()
        self.summaries = summaries
        self.prompt_tokens = prompt_tokens
        self.pool = pool
        self._init_memo()

    def _init_memo(self) -> None:
        # One request is scored against every candidate in turn: hash its prompt once per block size and take
        # its pool's least load once. Keyed on the request object (callers may reuse request ids).
        self._memo_request: RouteRequest | None = None
        self._memo_hashes: dict[int, list[int]] = {}
        self._memo_min_load: dict[tuple[str, str], float] = {}

    def _memo_for(self, request: RouteRequest) -> None:
        if request is not self._memo_request:
            self._memo_request, self._memo_hashes, self._memo_min_load = request, {}, {}

    def score(self, request: RouteRequest, worker: WorkerView) -> float:
        if self.pool is None:
            return self.miss(request, worker, load_score(worker))
        self._memo_for(request)
        key = (worker.deployment, worker.role)
        min_load = self._memo_min_load.get(key)
        if min_load is None:
            pool = self.pool(request, worker)
            min_load = self._memo_min_load[key] = min((load_score(w) for w in pool), default=load_score(worker))
        return self.miss(request, worker, min_load)

    def miss(self, request: RouteRequest, worker: WorkerView, min_load: float) -> float:
        """`bounded_miss` of `request` on `worker`, given the least load of its pool."""
        summary = self._summary(worker)
        if summary is None:
            # Same value as a worker holding nothing, so a silent worker is neither favoured nor shunned.
            return 0.0 if not (self._prompt_tokens(request) or request.prompt_hashes) else 1.0
        hashes = self.request_hashes(request, summary.block_size)
        num_matched = longest_prefix_match(hashes, summary.hashes)
        return bounded_miss(num_matched, len(hashes), load_score(worker), min_load, self.config)

    def _summary(self, worker: WorkerView) -> PrefixSummary | None:
        if self.summaries is not None:
            return self.summaries(worker.worker_id)
        if worker.prefix_block_hashes is None:
            return None
        block_size = worker.prefix_block_size or worker.kv_block_size
        return PrefixSummary(block_size=block_size, hashes=worker.prefix_block_hashes)

    def _prompt_tokens(self, request: RouteRequest) -> Sequence[int] | None:
        return self.prompt_tokens(request) if self.prompt_tokens is not None else request.prompt_token_ids

    def request_hashes(self, request: RouteRequest, block_size: int) -> list[int]:
        """Stable hashes of the prompt blocks a worker could serve from cache."""
        self._memo_for(request)
        hashes = self._memo_hashes.get(block_size)
        if hashes is None:
            tokens = self._prompt_tokens(request)
            hashes = self._memo_hashes[block_size] = prompt_block_hashes(request, block_size, self.config, tokens)
        return hashes


def prompt_block_hashes(
    request: RouteRequest, block_size: int, config: PrefixAffinityConfig, tokens: Sequence[int] | None = None
) -> list[int]:
    """The request's cacheable block hashes at `block_size`: precomputed ones when their block size matches,
    else hashed from `tokens` (default: its token ids); empty when it has neither."""
    given = request.prompt_hashes
    if given is not None and given.block_size == block_size:
        return list(given.hashes[: config.max_request_blocks])
    if tokens is None:
        tokens = request.prompt_token_ids
    return cacheable_prefix_hashes(tokens or (), block_size, request.adapter, config)


def cacheable_prefix_hashes(
    tokens: Sequence[int], block_size: int, adapter: str | None, config: PrefixAffinityConfig
) -> list[int]:
    """Hashes of the full blocks the engine would look up: it always computes the prompt's last token itself."""
    num_cacheable = max(len(tokens) - 1, 0)
    return prefix_block_hashes(tokens[:num_cacheable], block_size, adapter, max_blocks=config.max_request_blocks)

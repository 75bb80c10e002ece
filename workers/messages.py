"""What travels between the router, the control plane and the worker actors: plain dataclasses, no Ray.

The router imports these without importing Ray or torch-heavy engine code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The router's request type is the engine's own: it enters `Engine.add_request` as it is.
from workers.engine.request import GenerateCall as GenerateCall
from workers.engine.request import RequestOutput

ROLES = ("prefill", "decode", "mixed")
"""Serving roles a worker can have: prefill only, decode only, or both in one worker."""


class WrongRoleError(ValueError):
    """A call the worker's role does not serve, e.g. `generate` on a prefill worker (a routing bug)."""


@dataclass(kw_only=True)
class TokenChunk:
    """A piece of one request's output stream."""

    request_id: str
    """The request this chunk belongs to."""
    seq: int
    """Index in the output stream of `token_ids[0]` (0 is the first generated token); lets a consumer drop
    duplicates and detect gaps. A chunk without tokens carries the index the next token would have."""
    token_ids: list[int]
    """New tokens, usually one; empty on a final chunk that only reports an abort."""
    text: str = ""
    """Newly final text of these tokens (may lag the tokens by a few characters)."""
    finished: bool = False
    """The request is done; no chunk follows."""
    finish_reason: str | None = None
    """`stop`, `length` or `abort` once finished."""
    num_prompt_tokens: int = 0
    """Tokens in the prompt."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the worker's prefix cache."""
    worker_id: str = ""
    """Worker that produced the chunk."""
    migrated_to: str = ""
    """Set on the last chunk of a stream whose request moved to that worker (no tokens, not finished): continue
    with `attach(request_id, seq)` there."""
    logprobs: list[dict[int, float]] | None = None
    """Per token of `token_ids`: token id -> logprob of the sampled token and the top-n (None unless the request
    asked for `SamplingParams.logprobs`)."""


@dataclass(kw_only=True)
class MigrationStats:
    """Live-migration counters of one worker, as source and as destination."""

    num_started: int = 0
    """Migrations this worker started as the source."""
    num_committed: int = 0
    """Of those, committed on their destination."""
    num_aborted: int = 0
    """Of those, aborted (the request kept running here)."""
    bytes_moved: int = 0
    """KV bytes sent by this worker's migrations, committed or not."""
    last_downtime_ms: float = 0.0
    """Pause-to-runnable time of the last committed migration."""
    downtime_ms_total: float = 0.0
    """Sum over committed migrations of their downtime."""


@dataclass(kw_only=True)
class WorkerStats:
    """A load snapshot of one worker, for the router, the autoscaler and `raylane status`."""

    worker_id: str
    """The worker's id, `{deployment}-{role}-{n}`."""
    deployment: str
    """Deployment the worker serves."""
    role: str
    """`prefill`, `decode` or `mixed`."""
    num_running: int
    """Requests in the running batch."""
    num_waiting: int
    """Requests queued or preempted."""
    kv_blocks_used: int
    """KV blocks held by requests in the engine. Prefix-cached blocks no request holds count as free (they are
    reclaimable), so this is 0 exactly when no request holds KV."""
    kv_blocks_total: int
    """Size of the KV block pool."""
    kv_usage: float
    """`kv_blocks_used / kv_blocks_total`, in [0, 1]."""
    output_tokens_per_s: float
    """Generated tokens per second over the engine's recent window."""
    num_generated_tokens: int
    """Tokens generated since the worker started."""
    prefix_cache_hit_rate: float
    """Prompt tokens served from the prefix cache over prompt tokens scheduled."""
    num_prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache since the worker started (recomputes included)."""
    num_prefix_cache_hits: int = 0
    """Of those, tokens served from the cache."""
    num_preemptions: int
    """Preemptions since the worker started."""
    adapters: list[str]
    """LoRA adapters registered on the worker."""
    expert_counts: dict[int, list[int]]
    """MoE layer index -> tokens routed to each expert since start (empty for dense models)."""
    kv_bytes_per_block: int
    """Bytes of K and V one block holds across all layers; sizes a KV handoff."""
    kv_block_size: int = 16
    """Tokens per KV block (the engine's `block_size`); turns token forecasts into blocks."""
    num_pending_prefill_tokens: int = 0
    """Prompt and recompute tokens queued or mid-prefill: the prefill work a new request waits behind."""
    resident_adapters: list[str] | None = None
    """Adapters in a slot now (no load before their first token); None when the worker does not say."""
    num_adapter_slots: int = 0
    """Adapter slots; a non-resident adapter loads into a free one, or evicts the least recently used."""
    prefix_block_hashes: list[int] | None = None
    """Prefix-cache summary: `stable_block_hash` of the cached blocks a lookup can reach, those least likely to
    be evicted first (None: the worker publishes none)."""
    migration: MigrationStats = field(default_factory=MigrationStats)
    """Live-migration counters."""


@dataclass(kw_only=True, frozen=True)
class MigrationConfig:
    """How `LLMWorker.migrate_out` runs a multi-stage pre-copy."""

    max_stages: int = 4
    """Pre-copy stages (copies while the request keeps decoding) before the final, paused one."""
    last_stage_max_blocks: int = 2
    """Pause for the final copy as soon as at most this many blocks remain to copy."""
    reserve_timeout_s: float = 10.0
    """The destination frees its reserved blocks when no stage or commit came for this long (source died)."""
    stage_timeout_s: float = 10.0
    """The source aborts when one call to the destination takes longer than this (destination hung)."""
    attach_timeout_s: float = 30.0
    """The destination aborts a committed request nobody `attach`ed to within this time (router gone)."""

    def __post_init__(self) -> None:
        if self.max_stages < 0 or self.last_stage_max_blocks < 0:
            raise ValueError(
                "max_stages and last_stage_max_blocks must be >= 0, "
                f"got {self.max_stages} and {self.last_stage_max_blocks}"
            )
        for name in ("reserve_timeout_s", "stage_timeout_s", "attach_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(kw_only=True, frozen=True)
class MigrationReport:
    """How one live migration went, as the source reports it."""

    request_id: str
    """The migrated request."""
    source_id: str
    """Worker the request ran on."""
    destination_id: str
    """Worker it moved (or was to move) to."""
    outcome: str
    """`committed` (the request runs on the destination) or `aborted` (it still runs on the source, or finished)."""
    reason: str = ""
    """Why it aborted (empty when committed)."""
    num_stages: int = 0
    """Copies made, the final paused one included."""
    num_blocks_copied: int = 0
    """KV blocks sent over all stages."""
    bytes_moved: int = 0
    """KV bytes sent over all stages."""
    downtime_ms: float = 0.0
    """From pausing the request on the source until it was runnable on the destination (0 when aborted)."""
    total_ms: float = 0.0
    """The whole migration, from the reservation to the source freeing its blocks (or to the abort)."""


@dataclass(kw_only=True, frozen=True)
class RunningRequestInfo:
    """One running request as a migration policy or a drain sees it."""

    request_id: str
    """The request."""
    num_prompt_tokens: int
    """Prompt tokens."""
    num_output_tokens: int
    """Tokens generated so far."""
    max_tokens: int
    """The request's output limit."""
    priority: int
    """Lower is more important."""
    num_blocks: int
    """KV blocks it holds."""


@dataclass(kw_only=True, frozen=True)
class PrefillResult:
    """What a prefill worker reports after running a prompt to its first token."""

    first: TokenChunk
    """The first generated token (seq 0, or `len(resume_output_token_ids)` on a failover resume). When
    `first.finished`, there is nothing to decode."""
    prefill_ms: float
    """Wall time from accepting the call to holding the exported KV."""
    kv_bytes: int
    """Size of the exported KV (0 when the request already finished)."""


def chunk_from_output(output: RequestOutput, *, worker_id: str) -> TokenChunk:
    """The stream chunk for one engine step's output (it owns `output`'s lists from now on)."""
    return TokenChunk(
        request_id=output.request_id,
        seq=output.num_output_tokens - len(output.new_token_ids),
        token_ids=output.new_token_ids,
        text=output.text_delta,
        # A migrated stream ends here but the request goes on elsewhere: not finished for the client.
        finished=output.finished and not output.migrated_to,
        finish_reason=output.finish_reason,
        num_prompt_tokens=output.num_prompt_tokens,
        num_cached_tokens=output.num_cached_tokens,
        worker_id=worker_id,
        migrated_to=output.migrated_to,
        logprobs=output.logprobs,
    )

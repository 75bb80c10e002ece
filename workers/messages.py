"""What travels between the router, the control plane and the worker actors: plain dataclasses, no Ray.

The router imports these without importing Ray or torch-heavy engine code paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.request import RequestOutput
from workers.engine.sampling_params import SamplingParams

ROLES = ("prefill", "decode", "mixed")
"""Serving roles a worker can have: prefill only, decode only, or both in one worker."""


class WrongRoleError(ValueError):
    """A call the worker's role does not serve, e.g. `generate` on a prefill worker (a routing bug)."""


@dataclass(kw_only=True, frozen=True)
class GenerateCall:
    """One request as the router hands it to a worker."""

    request_id: str
    """Unique id of the request across the cluster; the engine refuses a duplicate."""
    prompt: str | None = None
    """Prompt text; exactly one of `prompt` and `prompt_token_ids` is given."""
    prompt_token_ids: tuple[int, ...] | None = None
    """Already tokenized prompt; exactly one of `prompt` and `prompt_token_ids` is given."""
    sampling: SamplingParams
    """How to sample and when to stop."""
    adapter: str | None = None
    """LoRA adapter name, or None for the base model."""
    priority: int = 0
    """Lower is more important (the engine's convention)."""

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        if self.prompt_token_ids is not None:
            # Accept lists from callers but keep the dataclass hashable.
            object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))

    @property
    def engine_prompt(self) -> str | list[int]:
        """The prompt in the form `Engine.add_request` takes."""
        return self.prompt if self.prompt is not None else list(self.prompt_token_ids or ())


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


@dataclass(kw_only=True, frozen=True)
class PrefillResult:
    """What a prefill worker reports after running a prompt to its first token."""

    first: TokenChunk
    """The first generated token (seq 0). When `first.finished`, there is nothing to decode."""
    prefill_ms: float
    """Wall time from accepting the call to holding the exported KV."""
    kv_bytes: int
    """Size of the exported KV (0 when the request already finished)."""


def chunk_from_output(output: RequestOutput, *, seq: int, worker_id: str) -> TokenChunk:
    """The stream chunk for one engine step's output; `seq` is the stream index of its first new token."""
    return TokenChunk(
        request_id=output.request_id,
        seq=seq,
        token_ids=list(output.new_token_ids),
        text=output.text_delta,
        finished=output.finished,
        finish_reason=output.finish_reason,
        num_prompt_tokens=output.num_prompt_tokens,
        num_cached_tokens=output.num_cached_tokens,
        worker_id=worker_id,
    )

"""What the scheduler is configured with and what one `schedule()` call hands the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.request import Request


class NoKVCapacityError(RuntimeError):
    """Not enough free KV blocks or running seats right now; the caller may retry later (UNAVAILABLE)."""


@dataclass(kw_only=True, frozen=True)
class SchedulerConfig:
    """Limits of one scheduler."""

    block_size: int
    """Tokens per KV block."""
    num_blocks: int
    """Blocks in the KV pool; the pool never grows."""
    max_num_batched_tokens: int
    """Token budget of one step: decodes plus prefill chunks."""
    max_num_seqs: int
    """Most requests running at once (each running request holds KV blocks)."""
    enable_prefix_caching: bool = True
    """Reuse cached full blocks across requests that share a prompt prefix (and adapter)."""
    max_model_len: int | None = None
    """Longest prompt plus output; None leaves only the KV pool as the limit."""
    max_loras: int | None = None
    """Most distinct LoRA adapters among running requests (the engine's adapter slots); None is unlimited."""
    short_prompt_tokens: int = 0
    """LAPS in time: waiting prompts of at most this many tokens start before longer ones (0: first come,
    first served); see `waiting_order`."""
    max_long_wait_s: float = 0.5
    """Under LAPS, a long prompt that has waited this long is no longer passed over."""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError(
                f"max_num_seqs ({self.max_num_seqs}) cannot exceed max_num_batched_tokens "
                f"({self.max_num_batched_tokens}): every running decode needs one token of the budget"
            )
        if self.short_prompt_tokens < 0 or self.max_long_wait_s < 0:
            raise ValueError(
                f"short_prompt_tokens and max_long_wait_s must be >= 0, got {self.short_prompt_tokens}, "
                f"{self.max_long_wait_s}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (one prompt and one output token), got {self.max_model_len}")


@dataclass
class ScheduledRequest:
    """Compute tokens `[num_computed_tokens, num_computed_tokens + num_new_tokens)` of `request` this step."""

    request: Request
    num_computed_tokens: int
    """Tokens whose KV is already in the cache when the step starts (the chunk's first position)."""
    num_new_tokens: int
    """Tokens to run through the model this step (1 for a decode)."""
    block_ids: list[int]
    """The request's block table, covering at least `num_computed_tokens + num_new_tokens` tokens."""

    @property
    def is_last_chunk(self) -> bool:
        """The step computes the request's last known token, so it samples a new one."""
        return self.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """One step's batch."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    """Single-token entries (decodes) first, then prefill chunks."""
    preempted_request_ids: list[str] = field(default_factory=list)
    """Requests that lost their KV blocks this step and went back to waiting (recompute later)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_decodes(self) -> int:
        """Leading single-token entries; the attention kernel batches them as decodes."""
        return next((i for i, s in enumerate(self.scheduled) if s.num_new_tokens != 1), len(self.scheduled))

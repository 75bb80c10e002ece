"""A request's state inside the engine, and what the engine reports back per step."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from workers.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """One generation request. The scheduler owns its status and `num_computed_tokens`."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    """The model's EOS tokens; ignored when `sampling_params.ignore_eos`."""
    lora_id: int = 0
    """Engine-wide adapter id; 0 is the base model. Part of the prefix-cache key."""
    lora_name: str | None = None
    priority: int = 0
    """Lower is more important (vLLM's convention)."""
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens of `all_token_ids` whose KV is in the cache."""
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache on first schedule (-1 until scheduled)."""
    num_preemptions: int = 0
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.all_token_ids.extend(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    """Tokens generated in this step (usually one; none while a prefill is still chunking)."""
    output_token_ids: list[int]
    """All tokens generated so far."""
    text_delta: str = ""
    """Newly final detokenized text."""
    finished: bool = False
    finish_reason: str | None = None
    """`stop`, `length` or `abort` once finished."""
    logprobs: list[dict[int, float]] | None = None
    """Per new token: token id -> logprob for the sampled token and the top-n."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    migrated_to: str = ""
    """Set on the last output of a request that moved to another worker (`finished`, no `finish_reason`)."""
    error: str = ""
    """Set on the last output of a request the engine failed alone (e.g. its sampling raised): its caller gets
    an error, not a normal end."""

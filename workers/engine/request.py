"""What enters the engine (`GenerateCall`), a request's state inside it, and what it reports back per step."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from workers.engine.sampling_params import SamplingParams


@dataclass(kw_only=True, frozen=True)
class GenerateCall:
    """One request as the router hands it to a worker, and as the worker hands it to `Engine.add_request`."""

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
    resume_output_token_ids: tuple[int, ...] = ()
    """Failover: output tokens the client already received. The worker recomputes prompt + these, continues at
    output index `len(resume_output_token_ids)` (they count toward `max_tokens` and stop checks) and never
    re-emits them."""
    resume_num_text_chars: int = 0
    """Failover: characters of output text the client already received; text resumes after them."""

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        object.__setattr__(self, "resume_output_token_ids", tuple(int(t) for t in self.resume_output_token_ids))
        if self.resume_num_text_chars < 0:
            raise ValueError(f"resume_num_text_chars must be >= 0, got {self.resume_num_text_chars}")
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        if self.prompt_token_ids is not None:
            # Accept lists from callers but keep the dataclass hashable.
            object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))


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
    """What one step produced for one request: only this step's tokens, so a step costs O(1) per request.

    Whoever needs the whole output accumulates it (the router's stream, `Engine.generate`).
    """

    request_id: str
    new_token_ids: list[int]
    """Tokens generated in this step (usually one; none while a prefill is still chunking)."""
    num_output_tokens: int = 0
    """Output tokens of the request after this step (resumed ones included): the last new token's index + 1."""
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


@dataclass
class Completion:
    """A whole request's result, as the offline `Engine.generate` returns it."""

    request_id: str
    output_token_ids: list[int]
    """Every generated token."""
    text: str
    """The generated text (a matched stop string cut off)."""
    finish_reason: str | None
    """`stop`, `length` or `abort`."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token, when the request asked for logprobs."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

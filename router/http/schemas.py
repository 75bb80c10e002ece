"""Request bodies of the OpenAI API, as pydantic models; responses are built as plain dicts (faster to encode).

Unknown fields are ignored, as OpenAI's own server does for fields it does not know; every float must be finite.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
"""Most choices one request may ask for (`n`): each is a full generation."""
MAX_STOP_STRINGS = 4
"""OpenAI's own limit on `stop` strings."""
MAX_LOGPROBS = 20
"""The engine's limit on top-n logprobs (`SamplingParams.logprobs`)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    """Send one more chunk before `[DONE]` with the usage and no choices (others carry `usage: null`)."""


class SamplingFields(_Body):
    """Fields both endpoints share."""

    model: str = Field(min_length=1)
    """Deployment, tier group, or `deployment:adapter`."""
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    """An extension (vLLM has it too): keep only the k most likely tokens."""
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    """An extension (vLLM has it too): generate past the model's EOS token."""
    tier: Literal["", "small", "large"] = ""
    """An extension: pin the tier when `model` names a tier group."""
    user: str | None = None
    """Accepted and ignored (the tenant comes from the API key)."""

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]]
    """One prompt (text or token ids) or a batch of them; each gets `n` choices."""
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """Logprobs of each sampled token and of this many alternatives."""
    echo: Literal[False] = False
    """Echoing the prompt back is not supported."""


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    """The newer name of `max_tokens`; wins when both are given."""
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """Alternatives per token; needs `logprobs: true`."""

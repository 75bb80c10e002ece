"""Per-request sampling parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.engine.errors import InvalidSamplingParamsError


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop."""

    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 0.0
    """0 means greedy; higher flattens the distribution."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; in (0, 1]."""
    seed: int | None = None
    """Seed of this request's own generator, making sampling reproducible."""
    stop_token_ids: tuple[int, ...] = ()
    """Finish when one of these tokens is generated (it is kept in the output)."""
    stop: tuple[str, ...] = ()
    """Finish when the detokenized text contains one of these strings (cut from the text)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token."""
    logprobs: int | None = None
    """Return the top-n logprobs of every generated token; None disables."""
    detokenize: bool = True
    """Produce text deltas; turn off when only token ids matter (saves decode work per token)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidSamplingParamsError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            # NaN passes every comparison below, then poisons the sampler; infinity is no better.
            if not math.isfinite(getattr(self, name)):
                raise InvalidSamplingParamsError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise InvalidSamplingParamsError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidSamplingParamsError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidSamplingParamsError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise InvalidSamplingParamsError("stop strings must be non-empty")
        if self.stop and not self.detokenize:
            raise InvalidSamplingParamsError("stop strings need detokenize=True")
        # Accept lists from callers but keep the dataclass hashable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

"""`GenerateCall`s for engine tests, from the (request id, prompt, params) most tests think in."""

from __future__ import annotations

from collections.abc import Sequence

from workers.engine.request import GenerateCall
from workers.engine.sampling_params import SamplingParams


def make_call(
    request_id: str,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    lora_name: str | None = None,
    priority: int = 0,
    resume_output_token_ids: Sequence[int] = (),
    resume_num_text_chars: int = 0,
) -> GenerateCall:
    """The call a router would send for this prompt (text or token ids)."""
    text, token_ids = (prompt, None) if isinstance(prompt, str) else (None, tuple(prompt))
    return GenerateCall(
        request_id=request_id,
        prompt=text,
        prompt_token_ids=token_ids,
        sampling=params or SamplingParams(),
        adapter=lora_name,
        priority=priority,
        resume_output_token_ids=tuple(resume_output_token_ids),
        resume_num_text_chars=resume_num_text_chars,
    )

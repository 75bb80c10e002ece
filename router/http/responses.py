"""OpenAI response bodies from token chunks: completions and chat, whole or as stream chunks, with logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.messages import TokenChunk


class TokenText(Protocol):
    """What logprobs need of a tokenizer: the text of one token."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(kw_only=True, frozen=True)
class ResponseShape:
    """What every body of one response shares."""

    response_id: str
    model: str
    created: int
    is_chat: bool
    num_top_logprobs: int | None
    """Alternatives per token when logprobs were asked for; None: no logprobs."""
    include_usage: bool = False


@dataclass
class ChoiceState:
    """One choice's output so far."""

    prompt_index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_text_chars: int = 0
    """Characters of text already sent (completions' `text_offset`)."""
    is_started: bool = False
    """A chat stream sent this choice's `role` already."""

    def add(self, chunk: TokenChunk) -> None:
        self.texts.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
        self.num_prompt_tokens = max(self.num_prompt_tokens, chunk.num_prompt_tokens)
        if chunk.finished:
            self.finish_reason = chunk.finish_reason


def usage(choices: list[ChoiceState]) -> dict[str, int]:
    """Prompt tokens count once per prompt (not once per choice), as OpenAI counts them."""
    prompt_tokens: dict[int, int] = {}
    for choice in choices:
        prompt_tokens[choice.prompt_index] = max(prompt_tokens.get(choice.prompt_index, 0), choice.num_prompt_tokens)
    completion = sum(len(choice.token_ids) for choice in choices)
    prompt = sum(prompt_tokens.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _ranked(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: -item[1])[:n]


def _token_text(tokenizer: TokenText, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(
    tokenizer: TokenText, token_ids: list[int], logprobs: list[dict[int, float]], n: int, text_offset: int
) -> dict[str, list[Any]]:
    """The legacy completions shape: parallel lists of tokens, their logprobs, top-n maps and text offsets."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(entry.get(token_id))
        top.append({_token_text(tokenizer, t): lp for t, lp in _ranked(entry, n)} if n else None)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(
    tokenizer: TokenText, token_ids: list[int], logprobs: list[dict[int, float]], n: int
) -> dict[str, list[Any]]:
    """The chat shape: per token its text, logprob, UTF-8 bytes and top-n alternatives."""

    def item(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        top = [item(t, lp) for t, lp in _ranked(entry, n)]
        content.append({**item(token_id, entry.get(token_id)), "top_logprobs": top})
    return {"content": content}


def _logprobs(shape: ResponseShape, tokenizer: TokenText | None, token_ids, logprobs, text_offset: int):
    if shape.num_top_logprobs is None or tokenizer is None:
        return None
    if shape.is_chat:
        return chat_logprobs(tokenizer, token_ids, logprobs, shape.num_top_logprobs)
    return completion_logprobs(tokenizer, token_ids, logprobs, shape.num_top_logprobs, text_offset)


def full_response(shape: ResponseShape, choices: list[ChoiceState], tokenizer: TokenText | None) -> dict[str, Any]:
    """A non-streaming completion or chat completion."""
    out = []
    for index, choice in enumerate(choices):
        text = "".join(choice.texts)
        logprobs = _logprobs(shape, tokenizer, choice.token_ids, choice.logprobs, 0)
        if shape.is_chat:
            body = {"index": index, "message": {"role": "assistant", "content": text}}
        else:
            body = {"index": index, "text": text}
        out.append({**body, "logprobs": logprobs, "finish_reason": choice.finish_reason})
    return {
        "id": shape.response_id,
        "object": "chat.completion" if shape.is_chat else "text_completion",
        "created": shape.created,
        "model": shape.model,
        "choices": out,
        "usage": usage(choices),
    }


def _envelope(shape: ResponseShape, choices: list[dict[str, Any]]) -> dict[str, Any]:
    body = {
        "id": shape.response_id,
        "object": "chat.completion.chunk" if shape.is_chat else "text_completion",
        "created": shape.created,
        "model": shape.model,
        "choices": choices,
    }
    if shape.include_usage:
        body["usage"] = None
    return body


def stream_chunk(
    shape: ResponseShape, index: int, choice: ChoiceState, chunk: TokenChunk, tokenizer: TokenText | None
) -> dict[str, Any] | None:
    """The stream body for one token chunk of choice `index` (already added to `choice`); None: nothing to send."""
    is_first = shape.is_chat and not choice.is_started
    if not (chunk.text or chunk.token_ids or chunk.finished or is_first):
        return None
    logprobs = _logprobs(shape, tokenizer, chunk.token_ids, chunk.logprobs or [], choice.num_text_chars)
    choice.num_text_chars += len(chunk.text)
    finish_reason = chunk.finish_reason if chunk.finished else None
    if shape.is_chat:
        choice.is_started = True
        delta: dict[str, str] = {"role": "assistant", "content": chunk.text} if is_first else {}
        if chunk.text and not is_first:
            delta["content"] = chunk.text
        body = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        body = {"index": index, "text": chunk.text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(shape, [body])


def usage_chunk(shape: ResponseShape, choices: list[ChoiceState]) -> dict[str, Any]:
    """The one extra chunk `stream_options.include_usage` asks for: usage, and no choices."""
    return {**_envelope(shape, []), "usage": usage(choices)}

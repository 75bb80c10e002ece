"""The OpenAI-compatible endpoints over a `RouterCore`: the same auth, quotas, admission, routing and failover
as gRPC.

`POST /v1/completions`, `POST /v1/chat/completions` (both stream as SSE with `stream: true`), `GET /v1/models`,
`GET /metrics` and `GET /health`. The `model` field names a deployment, a tier group, or `deployment:adapter`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from router import metrics
from router.auth_limit import AuthFailureLimiter
from router.core import GenerateInput, RouterCore
from router.errors import InvalidArgument, NotFound, RouterError
from router.http.chat import render_chat
from router.http.errors import error_body, error_handlers, status_of
from router.http.limits import EdgeGuard, HttpLimits
from router.http.responses import (
    ChoiceState,
    ResponseShape,
    TokenText,
    full_response,
    stream_chunk,
    usage_chunk,
)
from router.http.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from router.http.streams import OpenedChoice, merge_choices, open_choices
from router.table import RoutingTable

logger = logging.getLogger(__name__)

DEFAULT_CHAT_MAX_TOKENS = 1024
"""`max_tokens` of a chat request that names none (OpenAI's is "up to the context"); quotas reserve it up front."""
LONG_PROMPT_CHARS = 8192
"""Chat prompts longer than this render and are measured off the event loop, so one cannot stall the others."""


class ChatTokenizer(TokenText, Protocol):
    """What the HTTP front needs of a deployment's tokenizer (`workers.engine.tokenizer.Tokenizer` has it)."""

    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def id_to_token(self, token_id: int) -> str | None: ...


class TokenizerSource(Protocol):
    """Where deployments' tokenizers come from (`RayDirectory` in a router replica)."""

    async def tokenizer(self, deployment: str) -> ChatTokenizer: ...


class _SSEResponse(StreamingResponse):
    """A stream that closes its body however the response ends, so a client that leaves aborts its requests."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _json(body: Any, status_code: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status_code, media_type="application/json")


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def api_key_from(request: Request) -> str | None:
    """The bearer token of the `Authorization` header, if any."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def parse_model(model: str) -> tuple[str, str]:
    """`deployment` or `deployment:adapter` -> (deployment or tier group, adapter or "")."""
    deployment, _, adapter = model.partition(":")
    return deployment, adapter


class OpenAIFront:
    """The endpoints' logic; `build_app` mounts it. Runs on the router's event loop, like the gRPC servicer."""

    def __init__(self, core: RouterCore, tokenizers: TokenizerSource) -> None:
        self.core = core
        self.tokenizers = tokenizers

    # ---- endpoints ------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        # Validated straight from the bytes: pydantic's JSON parser, no intermediate dict.
        body = CompletionRequest.model_validate_json(await request.body())
        prompts = _completion_prompts(body.prompt)
        deployment, adapter = parse_model(body.model)
        inputs = [
            _input(body, deployment, adapter, prompt=prompt, max_tokens=body.max_tokens or 0, logprobs=body.logprobs)
            for prompt in prompts
        ]
        shape = self._shape(body, "cmpl", is_chat=False, num_top_logprobs=body.logprobs)
        return await self._run(body, shape, api_key_from(request), inputs)

    async def chat_completions(self, request: Request) -> Response:
        body = ChatCompletionRequest.model_validate_json(await request.body())
        api_key = api_key_from(request)
        deployment, adapter = parse_model(body.model)
        # Auth and the model come first: the template needs the model, and a stranger learns nothing of it.
        self.core.authenticate(api_key)
        table = self.core.directory.table()
        tokenizer = await self.tokenizers.tokenizer(_tokenizer_deployment(table, deployment))
        messages = [{"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})} for m in body.messages]
        if sum(len(m["content"]) for m in messages) > LONG_PROMPT_CHARS:
            prompt = await asyncio.to_thread(_chat_prompt, tokenizer, messages)
        else:
            prompt = _chat_prompt(tokenizer, messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs: true")
        num_top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens or _default_chat_max_tokens(table, deployment)
        inp = _input(body, deployment, adapter, prompt=prompt, max_tokens=max_tokens, logprobs=num_top)
        shape = self._shape(body, "chatcmpl", is_chat=True, num_top_logprobs=num_top)
        return await self._run(body, shape, api_key, [inp])

    async def models(self, request: Request) -> Response:
        tenant = self.core.authenticate(api_key_from(request))
        table = self.core.directory.table()
        data = [_model_card(name, "raylane") for name in sorted(table.deployments)]
        data += [_model_card(name, "raylane") for name in sorted(table.groups)]
        for (deployment, adapter), owner in sorted(table.adapter_owners.items()):
            if owner == tenant:
                data.append({**_model_card(f"{deployment}:{adapter}", tenant), "parent": deployment})
        return _json({"object": "list", "data": data})

    async def metrics(self, request: Request) -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok", "table_version": self.core.directory.table().version})

    # ---- the request path -------------------------------------------------------------------------

    def _shape(self, body: SamplingFields, prefix: str, *, is_chat: bool, num_top_logprobs: int | None):
        return ResponseShape(
            response_id=f"{prefix}-{uuid.uuid4().hex}",
            model=body.model,
            created=int(time.time()),
            is_chat=is_chat,
            num_top_logprobs=num_top_logprobs,
            include_usage=body.stream and body.include_usage,
        )

    async def _run(
        self, body: SamplingFields, shape: ResponseShape, api_key: str | None, prompts: list[GenerateInput]
    ) -> Response:
        inputs = _fan_out(prompts, body.n, shape.response_id)
        prompt_index = [i // body.n for i in range(len(inputs))]
        opened = await open_choices(self.core, api_key, inputs)
        try:
            tokenizer = await self._logprob_tokenizer(shape, inputs[0].deployment)
        except BaseException:
            for choice in opened:
                await choice.stream.aclose()
            raise
        states = [ChoiceState(prompt_index=i) for i in prompt_index]
        logger.info(
            "http request admitted id=%s model=%s choices=%d stream=%s",
            shape.response_id,
            body.model,
            len(inputs),
            body.stream,
        )
        if body.stream:
            return _SSEResponse(self._events(shape, opened, states, tokenizer), media_type="text/event-stream")
        async for index, chunk in merge_choices(opened):
            states[index].add(chunk)
        return _json(full_response(shape, states, tokenizer))

    async def _events(
        self, shape: ResponseShape, opened: list[OpenedChoice], states: list[ChoiceState], tokenizer
    ) -> AsyncIterator[bytes]:
        try:
            async for index, chunk in merge_choices(opened):
                states[index].add(chunk)
                body = stream_chunk(shape, index, states[index], chunk, tokenizer)
                if body is not None:
                    yield _sse(body)
        except RouterError as exc:
            # Headers are out: the error travels in the stream, as OpenAI's own server does it.
            yield _sse(status_of(exc)[1])
            yield b"data: [DONE]\n\n"
            return
        except Exception:
            logger.exception("http stream failed id=%s", shape.response_id)
            yield _sse(error_body("internal router error; retry", "internal_error", code="internal_error"))
            yield b"data: [DONE]\n\n"
            return
        if shape.include_usage:
            yield _sse(usage_chunk(shape, states))
        yield b"data: [DONE]\n\n"

    async def _logprob_tokenizer(self, shape: ResponseShape, deployment: str) -> TokenText | None:
        if shape.num_top_logprobs is None:
            return None
        return await self.tokenizers.tokenizer(_tokenizer_deployment(self.core.directory.table(), deployment))


def build_app(
    core: RouterCore,
    tokenizers: TokenizerSource,
    *,
    limits: HttpLimits | None = None,
    auth_limit: AuthFailureLimiter | None = None,
) -> Starlette:
    """The ASGI app of one router replica; `EdgeGuard` bounds each body by `limits` and refuses peers `auth_limit`
    (shared with the gRPC port) has locked out.

    Plain Starlette rather than FastAPI: the handlers validate their bodies themselves, which keeps FastAPI's
    per-request dependency machinery off the latency path.
    """
    front = OpenAIFront(core, tokenizers)
    routes = [
        Route("/v1/completions", front.completions, methods=["POST"]),
        Route("/v1/chat/completions", front.chat_completions, methods=["POST"]),
        Route("/v1/models", front.models, methods=["GET"]),
        Route("/metrics", front.metrics, methods=["GET"]),
        Route("/health", front.health, methods=["GET"]),
    ]
    guard = Middleware(EdgeGuard, limits=limits or HttpLimits(), auth_limit=auth_limit)
    return Starlette(routes=routes, exception_handlers=error_handlers(), middleware=[guard])


# ---- helpers ------------------------------------------------------------------------------------


def _completion_prompts(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | tuple[int, ...]]:
    if isinstance(prompt, str):
        prompts: list[str | tuple[int, ...]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [tuple(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [p if isinstance(p, str) else tuple(p) for p in prompt]  # type: ignore[union-attr]
    if not prompts or any(not p for p in prompts):
        raise InvalidArgument("prompt must be non-empty")
    return prompts


def _input(
    body: SamplingFields,
    deployment: str,
    adapter: str,
    *,
    prompt: str | tuple[int, ...],
    max_tokens: int,
    logprobs: int | None,
) -> GenerateInput:
    is_text = isinstance(prompt, str)
    return GenerateInput(
        deployment=deployment,
        adapter=adapter,
        prompt=prompt if is_text else "",
        prompt_token_ids=() if is_text else prompt,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p or 0.0,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=body.stop_strings,
        ignore_eos=body.ignore_eos,
        tier=body.tier,
        logprobs=logprobs,
    )


def _fan_out(prompts: list[GenerateInput], n: int, response_id: str) -> list[GenerateInput]:
    """`n` inputs per prompt; with a seed, choice i samples with seed + i so the choices differ reproducibly."""
    inputs = []
    for p, inp in enumerate(prompts):
        for i in range(n):
            seed = None if inp.seed is None else inp.seed + i
            inputs.append(dataclasses.replace(inp, request_id=f"{response_id}-{p * n + i}", seed=seed))
    return inputs


def _tokenizer_deployment(table: RoutingTable, name: str) -> str:
    """The deployment whose tokenizer serves model `name`: itself, or a tier group's small tier."""
    group = table.groups.get(name)
    if group is not None:
        return group.small
    if name not in table.deployments:
        raise NotFound(f"unknown model {name!r}")
    return name


def _default_chat_max_tokens(table: RoutingTable, name: str) -> int:
    route = table.deployments.get(name)
    limit = route.max_model_len if route is not None else None
    return min(DEFAULT_CHAT_MAX_TOKENS, limit) if limit else DEFAULT_CHAT_MAX_TOKENS


def _chat_prompt(tokenizer: ChatTokenizer, messages: list[dict[str, Any]]) -> str:
    bos = tokenizer.id_to_token(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None
    eos = tokenizer.id_to_token(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else None
    text = render_chat(tokenizer.chat_template, messages, bos_token=bos or "", eos_token=eos or "")
    # The router tokenizes text with special tokens on: when that adds a BOS itself, drop the template's.
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def _adds_bos(tokenizer: ChatTokenizer) -> bool:
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _model_card(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}

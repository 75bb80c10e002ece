"""The raylane client SDK: sync and async, streaming iterators, typed errors.

from router.client import Client

with Client("127.0.0.1:50051", api_key="rl-...") as client:
    for chunk in client.generate("chat", "Hello", max_tokens=32):
        print(chunk.text, end="", flush=True)
    print(client.complete("chat", "Hello", max_tokens=8).text)
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from protos.raylane.v1 import router_pb2, router_pb2_grpc


class RaylaneError(Exception):
    """A request failed; `code` is the gRPC status, `retry_after_s` is set when retrying can help."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgumentError(RaylaneError):
    """The request is malformed (bad sampling values, unknown deployment or adapter, oversized prompt)."""


class RequestValidationError(InvalidArgumentError, ValueError):
    """The SDK refused to send a request the router would refuse (e.g. a NaN temperature, max_tokens=-1)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


class AuthenticationError(RaylaneError):
    """No API key, or an unknown or revoked one."""


class PermissionDeniedError(RaylaneError):
    """The key's tenant may not use what the request names (e.g. another tenant's adapter)."""


class QuotaExceededError(RaylaneError):
    """The tenant is over its concurrency or token quota; wait `retry_after_s`."""


class UnavailableError(RaylaneError):
    """No capacity right now or a worker failed; wait `retry_after_s`."""


class DeadlineExceededError(RaylaneError):
    """The request's deadline passed; the server aborted it."""


_ERRORS: dict[grpc.StatusCode, type[RaylaneError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


@dataclass(kw_only=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(kw_only=True)
class Chunk:
    """A piece of a streamed generation; `seq` is the index of `token_ids[0]` in the output."""

    request_id: str
    seq: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    usage: Usage | None = None


@dataclass(kw_only=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage = field(default_factory=Usage)
    ttft_ms: float = 0.0


def build_request(
    deployment: str,
    prompt: str | Sequence[int],
    *,
    adapter: str | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    request_id: str = "",
    priority: int = 0,
    tier: str = "",
) -> router_pb2.GenerateRequest:
    """A `GenerateRequest`; `prompt` is text, or token ids. `tier` pins `small`/`large` when `deployment` is a
    tier group. Raises `RequestValidationError` for values the router would refuse, before anything is sent."""
    _check_sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    for name, ids in (
        ("prompt token ids", () if isinstance(prompt, str) else prompt),
        ("stop_token_ids", stop_token_ids),
    ):
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise RequestValidationError(f"{name} must be integers >= 0")
    sampling = router_pb2.SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
    )
    if seed is not None:
        sampling.seed = seed
    request = router_pb2.GenerateRequest(
        deployment=deployment,
        adapter=adapter or "",
        sampling=sampling,
        request_id=request_id,
        priority=priority,
        tier=tier,
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    return request


def _check_sampling(*, max_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
    for name, value in (("max_tokens", max_tokens), ("top_k", top_k), ("seed", 0 if seed is None else seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RequestValidationError(f"{name} must be an integer >= 0, got {value!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        # NaN passes `>= 0`-style checks; the router refuses it, so the SDK refuses it first.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RequestValidationError(f"{name} must be a finite number, got {value!r}")
    if temperature < 0:
        raise RequestValidationError(f"temperature must be >= 0, got {temperature}")
    if not 0 <= top_p <= 1:
        raise RequestValidationError(f"top_p must be in (0, 1] (0 means 1), got {top_p}")


def _usage(u: router_pb2.Usage) -> Usage:
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_prompt_tokens=u.cached_prompt_tokens,
    )


def _chunk(message: router_pb2.TokenChunk) -> Chunk:
    usage = _usage(message.usage) if message.finished else None
    return Chunk(
        request_id=message.request_id,
        seq=message.seq,
        token_ids=list(message.token_ids),
        text=message.text,
        finished=message.finished,
        finish_reason=message.finish_reason or None,
        usage=usage,
    )


def _completion(message: router_pb2.CompleteResponse) -> Completion:
    return Completion(
        request_id=message.request_id,
        text=message.text,
        token_ids=list(message.token_ids),
        finish_reason=message.finish_reason,
        usage=_usage(message.usage),
        ttft_ms=message.ttft_ms,
    )


def translate_error(error: grpc.RpcError) -> RaylaneError:
    """The typed error for a failed call."""
    code = error.code()
    retry = None
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            retry = int(value) / 1000
    return _ERRORS.get(code, RaylaneError)(code, error.details() or "", retry)


def channel_credentials(tls_ca_file: str) -> grpc.ChannelCredentials:
    """TLS that trusts the CA (or self-signed certificate) in `tls_ca_file`."""
    return grpc.ssl_channel_credentials(root_certificates=Path(tls_ca_file).expanduser().read_bytes())


def open_channel(address: str, tls_ca_file: str | None = None) -> grpc.Channel:
    """A blocking channel: TLS when `tls_ca_file` is given, else plaintext."""
    if tls_ca_file:
        return grpc.secure_channel(address, channel_credentials(tls_ca_file))
    return grpc.insecure_channel(address)


def open_aio_channel(address: str, tls_ca_file: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel: TLS when `tls_ca_file` is given, else plaintext."""
    if tls_ca_file:
        return grpc.aio.secure_channel(address, channel_credentials(tls_ca_file))
    return grpc.aio.insecure_channel(address)


class Client:
    """Blocking client. Thread-safe; share one per process."""

    def __init__(
        self, address: str, api_key: str, *, timeout_s: float | None = None, tls_ca_file: str | None = None
    ) -> None:
        self._channel = open_channel(address, tls_ca_file)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self.timeout_s = timeout_s

    def generate(self, deployment: str, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[Chunk]:
        """Stream chunks as they are generated. `timeout_s=` sets this call's deadline; breaking out cancels."""
        timeout = kwargs.pop("timeout_s", self.timeout_s)
        request = build_request(deployment, prompt, **kwargs)
        call = self._stub.Generate(request, metadata=self._metadata, timeout=timeout)
        try:
            for message in call:
                yield _chunk(message)
        except grpc.RpcError as exc:
            raise translate_error(exc) from None
        finally:
            call.cancel()

    def complete(self, deployment: str, prompt: str | Sequence[int], **kwargs: Any) -> Completion:
        timeout = kwargs.pop("timeout_s", self.timeout_s)
        try:
            response = self._stub.Complete(
                build_request(deployment, prompt, **kwargs), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_error(exc) from None
        return _completion(response)

    def count_tokens(self, deployment: str, text: str) -> int:
        try:
            request = router_pb2.CountTokensRequest(deployment=deployment, text=text)
            return self._stub.CountTokens(request, metadata=self._metadata, timeout=self.timeout_s).num_tokens
        except grpc.RpcError as exc:
            raise translate_error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; create and use it on one event loop."""

    def __init__(
        self, address: str, api_key: str, *, timeout_s: float | None = None, tls_ca_file: str | None = None
    ) -> None:
        self._channel = open_aio_channel(address, tls_ca_file)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self.timeout_s = timeout_s

    async def generate(self, deployment: str, prompt: str | Sequence[int], **kwargs: Any) -> AsyncIterator[Chunk]:
        timeout = kwargs.pop("timeout_s", self.timeout_s)
        request = build_request(deployment, prompt, **kwargs)
        call = self._stub.Generate(request, metadata=self._metadata, timeout=timeout)
        try:
            async for message in call:
                yield _chunk(message)
        except grpc.RpcError as exc:
            raise translate_error(exc) from None
        finally:
            call.cancel()

    async def complete(self, deployment: str, prompt: str | Sequence[int], **kwargs: Any) -> Completion:
        timeout = kwargs.pop("timeout_s", self.timeout_s)
        try:
            response = await self._stub.Complete(
                build_request(deployment, prompt, **kwargs), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_error(exc) from None
        return _completion(response)

    async def count_tokens(self, deployment: str, text: str) -> int:
        try:
            request = router_pb2.CountTokensRequest(deployment=deployment, text=text)
            response = await self._stub.CountTokens(request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise translate_error(exc) from None
        return response.num_tokens

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

"""The gRPC `Router` servicer: protobuf in, `RouterCore` in the middle, protobuf and status codes out."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from protos.raylane.v1 import router_pb2, router_pb2_grpc
from router.auth_limit import AuthFailureLimiter, lockout_error, peer_host
from router.core import GenerateInput, RouterCore
from router.errors import InvalidArgument, RouterError, Unauthenticated, Unavailable
from router.grpc_server import start_grpc_server
from workers.messages import TokenChunk

if TYPE_CHECKING:
    from router.server import RouterConfig

logger = logging.getLogger(__name__)

RETRY_METADATA_KEY = "retry-after-ms"
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


def api_key_from(context: grpc.aio.ServicerContext) -> str | None:
    """The bearer token of the `authorization` metadata, if any."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class _Malformed:
    """Stands for request bytes that do not parse, so the method can answer INVALID_ARGUMENT."""


MALFORMED = _Malformed()


def tolerant_parser(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # grpc answers a deserializer's exception with UNKNOWN and the parser's name; bad bytes are bad input.
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return MALFORMED

    return deserialize


def _check_parsed(request: Any, kind: type) -> None:
    if request is MALFORMED:
        raise InvalidArgument(f"the request body is not a valid {kind.DESCRIPTOR.full_name} message")


def add_router_servicer(servicer: RouterServicer, server: grpc.aio.Server) -> None:
    """`add_RouterServicer_to_server`, except that unparsable request bytes reach the method as `MALFORMED`."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=tolerant_parser(router_pb2.GenerateRequest.FromString),
            response_serializer=router_pb2.TokenChunk.SerializeToString,
        ),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete,
            request_deserializer=tolerant_parser(router_pb2.GenerateRequest.FromString),
            response_serializer=router_pb2.CompleteResponse.SerializeToString,
        ),
        "CountTokens": grpc.unary_unary_rpc_method_handler(
            servicer.CountTokens,
            request_deserializer=tolerant_parser(router_pb2.CountTokensRequest.FromString),
            response_serializer=router_pb2.CountTokensResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ROUTER_SERVICE, handlers),))
    server.add_registered_method_handlers(ROUTER_SERVICE, handlers)


def to_input(request: router_pb2.GenerateRequest) -> GenerateInput:
    _check_parsed(request, router_pb2.GenerateRequest)
    s = request.sampling
    return GenerateInput(
        deployment=request.deployment,
        prompt=request.prompt,
        prompt_token_ids=tuple(request.prompt_token_ids),
        adapter=request.adapter,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        request_id=request.request_id,
        priority=request.priority,
        tier=request.tier,
    )


def to_proto(chunk: TokenChunk, num_output_tokens: int) -> router_pb2.TokenChunk:
    message = router_pb2.TokenChunk(
        request_id=chunk.request_id,
        seq=chunk.seq,
        token_ids=chunk.token_ids,
        text=chunk.text,
        finished=chunk.finished,
        finish_reason=chunk.finish_reason or "",
    )
    if chunk.finished:
        message.usage.CopyFrom(
            router_pb2.Usage(
                prompt_tokens=chunk.num_prompt_tokens,
                completion_tokens=num_output_tokens,
                cached_prompt_tokens=chunk.num_cached_tokens,
            )
        )
    return message


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Maps `RouterError`s to status codes (with a `retry-after-ms` trailer) and never leaks a traceback."""

    def __init__(self, core: RouterCore, count_tokens=None, auth_limit: AuthFailureLimiter | None = None) -> None:
        self.core = core
        self._count_tokens = count_tokens
        self.auth_limit = auth_limit
        """Shared with the HTTP front: a peer that keeps failing authentication is refused on both."""

    def _admit_peer(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's address; a locked-out one is refused (RESOURCE_EXHAUSTED) whatever key it sends."""
        peer = peer_host(context.peer() or "")
        if self.auth_limit is not None:
            refusal = lockout_error(self.auth_limit, peer)
            if refusal is not None:
                raise refusal
        return peer

    async def _refuse(self, context: grpc.aio.ServicerContext, peer: str, exc: RouterError) -> None:
        if self.auth_limit is not None and isinstance(exc, Unauthenticated):
            self.auth_limit.record_failure(peer)
        await _abort(context, exc)

    async def Generate(self, request, context) -> AsyncIterator[router_pb2.TokenChunk]:
        num_tokens = 0
        peer = ""
        try:
            peer = self._admit_peer(context)
            async for chunk in self.core.generate(api_key_from(context), to_input(request)):
                num_tokens += len(chunk.token_ids)
                yield to_proto(chunk, num_tokens)
        except RouterError as exc:
            await self._refuse(context, peer, exc)
        except Exception:
            logger.exception("Generate failed")
            await _abort(context, Unavailable("internal router error; retry", retry_after_s=1.0))

    async def Complete(self, request, context) -> router_pb2.CompleteResponse:
        start = time.perf_counter()
        response = router_pb2.CompleteResponse()
        texts: list[str] = []
        peer = ""
        try:
            peer = self._admit_peer(context)
            async for chunk in self.core.generate(api_key_from(context), to_input(request)):
                if not response.token_ids and chunk.token_ids:
                    response.ttft_ms = (time.perf_counter() - start) * 1e3
                response.request_id = chunk.request_id
                response.token_ids.extend(chunk.token_ids)
                texts.append(chunk.text)
                if chunk.finished:
                    response.finish_reason = chunk.finish_reason or ""
                    response.usage.CopyFrom(to_proto(chunk, len(response.token_ids)).usage)
        except RouterError as exc:
            await self._refuse(context, peer, exc)
        except Exception:
            logger.exception("Complete failed")
            await _abort(context, Unavailable("internal router error; retry", retry_after_s=1.0))
        response.text = "".join(texts)
        return response

    async def CountTokens(self, request, context) -> router_pb2.CountTokensResponse:
        peer = ""
        try:
            peer = self._admit_peer(context)
            tenant = self.core.authenticate(api_key_from(context))
            _check_parsed(request, router_pb2.CountTokensRequest)
            if request.deployment not in self.core.directory.table().deployments:
                raise InvalidArgument(f"unknown deployment {request.deployment!r}")
            if self._count_tokens is None:
                raise Unavailable("token counting is not available on this router")
            num = await self._count_tokens(request.deployment, request.text)
            logger.debug("count tokens tenant=%s deployment=%s tokens=%d", tenant, request.deployment, num)
            return router_pb2.CountTokensResponse(num_tokens=num)
        except RouterError as exc:
            await self._refuse(context, peer, exc)


async def _abort(context: grpc.aio.ServicerContext, exc: RouterError) -> None:
    if exc.retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_METADATA_KEY, str(int(exc.retry_after_s * 1000))),))
    logger.info("request refused status=%s reason=%s", exc.status.value, exc.message)
    await context.abort(getattr(grpc.StatusCode, exc.status.value), exc.message)


async def start_router_server(servicer: RouterServicer, config: RouterConfig) -> tuple[grpc.aio.Server, int]:
    """A `grpc.aio` server for `servicer` with health checking and reflection (TLS if configured); returns it and
    its bound port."""
    return await start_grpc_server(
        lambda server: add_router_servicer(servicer, server),
        ROUTER_SERVICE,
        config.host,
        config.port,
        tls_cert_file=config.tls_cert_file,
        tls_key_file=config.tls_key_file,
    )

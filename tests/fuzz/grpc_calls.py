"""Raw-bytes gRPC calls for the fuzz tests, and the check every answer must pass."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

TYPED_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
    }
)
"""What a caller can act on. Never UNKNOWN or INTERNAL (a bug), never DEADLINE_EXCEEDED (a hang)."""
LEAKY_WORDS = ("Traceback", "internal router error", " object at 0x")
"""Details that betray an unexpected exception (the servicer masks those as `internal router error`)."""


@dataclass(frozen=True)
class Answer:
    """How one call ended."""

    code: grpc.StatusCode
    """OK, or the status the call failed with."""
    details: str
    """The status message (empty on OK)."""
    responses: tuple[bytes, ...]
    """Serialized responses: one for a unary call, each streamed one for a streaming call."""


def call_raw(
    channel: grpc.Channel,
    method: str,
    payload: bytes,
    *,
    is_stream: bool,
    metadata: tuple[tuple[str, str | bytes], ...],
    timeout_s: float,
) -> Answer:
    """Send `payload` as the request's bytes, unparsed, to `method` (`/package.Service/Method`)."""
    kind = channel.unary_stream if is_stream else channel.unary_unary
    stub = kind(method, request_serializer=None, response_deserializer=None)
    try:
        result = stub(payload, metadata=metadata, timeout=timeout_s)
        responses = tuple(result) if is_stream else (result,)
    except grpc.RpcError as exc:
        return Answer(exc.code(), exc.details() or "", ())
    return Answer(grpc.StatusCode.OK, "", responses)


def assert_typed(answer: Answer, what: str) -> None:
    """A typed status the caller can act on, with a message that leaks no internals."""
    assert answer.code in TYPED_CODES, f"{what}: {answer.code.name} {answer.details!r}"
    assert not any(word in answer.details for word in LEAKY_WORDS), f"{what}: leaky details {answer.details!r}"

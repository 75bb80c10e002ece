"""`RouterError`s and bad requests as OpenAI error bodies: `{"error": {"message", "type", "param", "code"}}`.

Status codes follow OpenAI's: 400 bad input (bodies that fail validation included, never a 422), 401 no or
wrong key, 403 another tenant's adapter, 404 unknown model, 429 quota and 503 no capacity (both with
`Retry-After`). Never a traceback.
"""

from __future__ import annotations

import json
import logging
import math

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

from router.errors import NotFound, RouterError, Status

logger = logging.getLogger(__name__)

_BY_STATUS: dict[Status, tuple[int, str, str]] = {
    Status.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_argument"),
    Status.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    Status.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    Status.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    Status.UNAVAILABLE: (503, "service_unavailable", "no_capacity"),
    Status.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
    Status.CANCELLED: (499, "cancelled", "cancelled"),
    Status.INTERNAL: (500, "internal_error", "internal_error"),
}


def error_body(message: str, type_: str, *, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_of(exc: RouterError) -> tuple[int, dict]:
    """The HTTP status and OpenAI error body of a router error."""
    if isinstance(exc, NotFound):
        return 404, error_body(exc.message, "invalid_request_error", code="model_not_found", param="model")
    status, type_, code = _BY_STATUS[exc.status]
    return status, error_body(exc.message, type_, code=code)


def error_response(exc: RouterError) -> Response:
    """The response for a request refused before its stream started; one log line per refusal."""
    status, body = status_of(exc)
    headers = {}
    if exc.retry_after_s is not None:
        # Retry-After takes whole seconds; round up so a client never retries early.
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    logger.info("http request refused status=%d reason=%s", status, exc.message)
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    errors = exc.errors(include_url=False)
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param


def error_handlers() -> dict[type[Exception], ExceptionHandler]:
    """OpenAI error bodies for router errors, invalid bodies, unknown routes and anything unexpected."""

    async def on_router_error(request: Request, exc: RouterError) -> Response:
        return error_response(exc)

    async def on_validation(request: Request, exc: ValidationError) -> Response:
        message, param = _validation_message(exc)
        body = error_body(message, "invalid_request_error", code="invalid_argument", param=param)
        return Response(json.dumps(body), status_code=400, media_type="application/json")

    async def on_http(request: Request, exc: HTTPException) -> Response:
        body = error_body(str(exc.detail), "invalid_request_error", code=None)
        return Response(json.dumps(body), status_code=exc.status_code, media_type="application/json")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.error("http request failed path=%s error=%s", request.url.path, type(exc).__name__, exc_info=exc)
        body = error_body("internal router error; retry", "internal_error", code="internal_error")
        return Response(json.dumps(body), status_code=500, media_type="application/json")

    return {
        RouterError: on_router_error,
        ValidationError: on_validation,
        HTTPException: on_http,
        Exception: on_unexpected,
    }

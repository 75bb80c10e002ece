"""Errors the router returns to clients, each with its gRPC status (docs/architecture.md, "How a request flows")."""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """The gRPC status codes the router uses (names match `grpc.StatusCode`)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class RouterError(Exception):
    """A request failed in a way the client should be told about; never carries a stack trace out."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgument(RouterError):
    status = Status.INVALID_ARGUMENT


class NotFound(InvalidArgument):
    """An unknown deployment, tier group or adapter: `INVALID_ARGUMENT` over gRPC, 404 over HTTP."""


class Unauthenticated(RouterError):
    status = Status.UNAUTHENTICATED


class PermissionDenied(RouterError):
    status = Status.PERMISSION_DENIED


class ResourceExhausted(RouterError):
    status = Status.RESOURCE_EXHAUSTED


class Unavailable(RouterError):
    status = Status.UNAVAILABLE


class WorkerLost(Unavailable):
    """The worker serving a request died or became unreachable mid-call (e.g. a Ray actor died).

    Dispatch resumes the request on another worker by recompute; only when the retries run out does
    the client see `UNAVAILABLE`.
    """

    def __init__(self, worker_id: str, message: str = "") -> None:
        super().__init__(message or f"worker {worker_id} was lost", retry_after_s=0.5)
        self.worker_id = worker_id

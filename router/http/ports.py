"""What an `http_port` setting means, shared by `RouterConfig`, `ControlPlaneConfig` and the CLI."""

from __future__ import annotations

HTTP_OFF = 0
"""`http_port` value that turns the HTTP front off."""
HTTP_FREE_PORT = -1
"""`http_port` value that binds a free port (0 already means off); tests and several routers on one host use it."""


def check_http_port(name: str, port: object) -> None:
    """`ValueError` unless `port` is an HTTP port setting: a port, `HTTP_OFF` or `HTTP_FREE_PORT`."""
    if isinstance(port, bool) or not isinstance(port, int) or not HTTP_FREE_PORT <= port < 65536:
        raise ValueError(f"{name} must be an integer in [1, 65535], 0 (off) or -1 (a free port), got {port!r}")


def replica_http_port(first: int, index: int) -> int:
    """The HTTP port setting of router replica `index` when the first one gets `first` (like the gRPC ports)."""
    return first + index if first > 0 else first

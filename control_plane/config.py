"""The control plane's configuration; the one place raylane reads environment variables."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from router.auth_limit import AuthLimitConfig
from router.grpc_server import check_tls_files
from router.http.ports import check_http_port
from router.registry import DEFAULT_POLICY

ENV_PREFIX = "RAYLANE_"
DEFAULT_STATE_DIR = "~/.raylane"


@dataclass(kw_only=True, frozen=True)
class ControlPlaneConfig:
    """How `raylane up` runs the control plane, its state store and its routers."""

    state_dir: str = DEFAULT_STATE_DIR
    """Where the embedded Redis keeps its AOF, and where the CLI finds the running cluster."""
    redis_url: str | None = None
    """An external Redis (`redis://host:6379/0`); None starts an embedded one in `state_dir`."""
    admin_host: str = "127.0.0.1"
    """Interface of the admin gRPC service (`0.0.0.0` in Kubernetes)."""
    admin_port: int = 50050
    """Port of the admin gRPC service; 0 picks a free one."""
    router_host: str = "127.0.0.1"
    """Interface of the routers' gRPC services."""
    router_port: int = 50051
    """Port of the first router; replica i listens on `router_port + i` (0 picks free ports)."""
    metrics_port: int = 9090
    """Port of the control plane's Prometheus `/metrics` (on `admin_host`); 0 turns it off, -1 picks a free one
    (`ClusterInfo.metrics_address` says which)."""
    router_metrics_port: int = 9091
    """Port of the first router's Prometheus `/metrics` (on `router_host`); replica i uses `router_metrics_port + i`;
    0 turns it off, -1 picks free ports (`ClusterInfo.router_metrics_addresses`). Routers serve `/metrics` on their
    HTTP port too."""
    router_http_port: int = 8000
    """Port of the first router's OpenAI-compatible HTTP API (on `router_host`); replica i uses `router_http_port + i`;
    0 turns it off, -1 picks free ports."""
    num_routers: int = 1
    """Router replicas the control plane starts as Ray actors; 0 when routers run elsewhere (`raylane router serve`,
    e.g. the Helm chart's router Deployment)."""
    reconcile_interval_s: float = 1.0
    """Pause between reconcile passes."""
    redis_check_interval_s: float = 1.0
    """How often the control plane checks that its embedded Redis runs (and restarts it from the AOF if not)."""
    router_policy: str = DEFAULT_POLICY
    """Routing policy of the routers the control plane starts (names in router/registry.py)."""
    router_admission: bool = False
    """Predictive KV admission in those routers (queue instead of overflowing a worker's KV)."""
    router_max_failovers: int = 3
    """Workers a request may lose mid-stream (resumed elsewhere by recompute) before its client gets UNAVAILABLE."""
    rebalance_interval_s: float = 0.0
    """Seconds between passes of the live-migration rebalancer in the reconcile loop; 0 (the default) turns it off."""
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    """The admin credential itself (`RAYLANE_ADMIN_TOKEN`); prefer `admin_token_file`. None: `admin_token_file`, else
    `<state_dir>/admin-token`, created (mode 0600) at first start."""
    admin_token_file: str | None = None
    """File holding the admin credential (e.g. a mounted Kubernetes Secret)."""
    tls_cert_file: str | None = None
    """PEM certificate (chain) for the admin and router ports; with `tls_key_file` they speak only TLS."""
    tls_key_file: str | None = None
    """PEM private key matching `tls_cert_file`."""
    auth_max_failures: int = 10
    """Failed authentications from one address within `auth_failure_window_s` that lock it out (RESOURCE_EXHAUSTED
    with a retry hint, whatever it sends, for `auth_failure_window_s`): on the admin API, and on each router's gRPC
    and HTTP ports together. 0 turns the lockout off."""
    auth_failure_window_s: float = 60.0
    """The window failed authentications are counted over, and how long a lockout lasts."""

    def __post_init__(self) -> None:
        # Absolute now, in the caller's directory: the actor that uses it runs elsewhere.
        object.__setattr__(self, "state_dir", str(Path(self.state_dir).expanduser().absolute()))
        for name in ("admin_port", "router_port"):
            port = getattr(self, name)
            # bool is an int subclass, but `admin_port: true` in YAML is a typo, not port 1.
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
                raise ValueError(f"{name} must be an integer in [0, 65535], got {port!r}")
        # 0 already means off for these, so -1 picks a free port, as for the HTTP front.
        for name in ("router_http_port", "metrics_port", "router_metrics_port"):
            check_http_port(name, getattr(self, name))
        if isinstance(self.num_routers, bool) or not isinstance(self.num_routers, int) or self.num_routers < 0:
            raise ValueError(f"num_routers must be an integer >= 0, got {self.num_routers!r}")
        if self.reconcile_interval_s <= 0:
            raise ValueError(f"reconcile_interval_s must be positive, got {self.reconcile_interval_s}")
        if self.redis_check_interval_s <= 0:
            raise ValueError(f"redis_check_interval_s must be positive, got {self.redis_check_interval_s}")
        if self.rebalance_interval_s < 0:
            raise ValueError(f"rebalance_interval_s must be >= 0 (0 disables), got {self.rebalance_interval_s}")
        if isinstance(self.router_max_failovers, bool) or not isinstance(self.router_max_failovers, int):
            raise ValueError(f"router_max_failovers must be an integer, got {self.router_max_failovers!r}")
        if self.router_max_failovers < 0:
            raise ValueError(f"router_max_failovers must be >= 0, got {self.router_max_failovers}")
        check_tls_files(self.tls_cert_file, self.tls_key_file)
        self.auth_limit_config()

    def auth_limit_config(self) -> AuthLimitConfig:
        return AuthLimitConfig(max_failures=self.auth_max_failures, window_s=self.auth_failure_window_s)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @classmethod
    def load(cls, file: str | Path | None = None, **overrides: Any) -> ControlPlaneConfig:
        """Defaults, then `RAYLANE_*` environment variables, then a YAML file, then explicit overrides."""
        values: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in fields.items():
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = _parse(name, raw, f.type)
        if file is not None:
            data = yaml.safe_load(Path(file).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{file}: a cluster config must be a YAML mapping")
            unknown = sorted(set(data) - set(fields))
            if unknown:
                raise ValueError(f"{file}: unknown key {unknown[0]!r}; known: {', '.join(sorted(fields))}")
            values.update(data)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def admin_token_from_env() -> str | None:
    """`RAYLANE_ADMIN_TOKEN`, for admin clients (the CLI) that have no state directory with the token in it."""
    return os.environ.get(ENV_PREFIX + "ADMIN_TOKEN") or None


def tls_ca_file_from_env() -> str | None:
    """`RAYLANE_TLS_CA_FILE`: the CA (or self-signed certificate) CLI clients trust; unset: plaintext."""
    return os.environ.get(ENV_PREFIX + "TLS_CA_FILE") or None


def _parse(name: str, raw: str, type_name: Any) -> Any:
    type_text = str(type_name)
    try:
        if type_text.startswith("int"):
            return int(raw)
        if type_text.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from None
    return raw

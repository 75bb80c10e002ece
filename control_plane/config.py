"""The control plane's configuration; the one place raylane reads environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router import config_tree
from router.auth_limit import AuthLimitConfig
from router.config import RouterConfig
from router.grpc_server import check_tls_files
from router.http.ports import check_http_port, replica_http_port

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
    metrics_port: int = 9090
    """Port of the control plane's Prometheus `/metrics` (on `admin_host`); 0 turns it off, -1 picks a free one
    (`ClusterInfo.metrics_address` says which)."""
    num_routers: int = 1
    """Router replicas the control plane starts as Ray actors; 0 when routers run elsewhere (`raylane router serve`,
    e.g. the Helm chart's router Deployment)."""
    reconcile_interval_s: float = 1.0
    """Pause between reconcile passes."""
    redis_check_interval_s: float = 1.0
    """How often the control plane checks that its embedded Redis runs (and restarts it from the AOF if not)."""
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
    auth_limit: AuthLimitConfig = field(default_factory=AuthLimitConfig)
    """Lockout of addresses that keep failing authentication on the admin API (the routers' is
    `router.auth_limit`): RESOURCE_EXHAUSTED with a retry hint, whatever they send, for `window_s`."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """The routers the control plane starts (router/config.py): replica i listens on `router.port + i` (and
    `http_port + i`, `metrics_port + i`); the top-level TLS pair covers them, so `router.tls_*` stays unset."""

    def __post_init__(self) -> None:
        # Absolute now, in the caller's directory: the actor that uses it runs elsewhere.
        object.__setattr__(self, "state_dir", str(Path(self.state_dir).expanduser().absolute()))
        # bool is an int subclass, but `admin_port: true` in YAML is a typo, not port 1.
        if (
            isinstance(self.admin_port, bool)
            or not isinstance(self.admin_port, int)
            or not 0 <= self.admin_port < 65536
        ):
            raise ValueError(f"admin_port must be an integer in [0, 65535], got {self.admin_port!r}")
        # 0 already means off, so -1 picks a free port, as for the HTTP front.
        check_http_port("metrics_port", self.metrics_port)
        if isinstance(self.num_routers, bool) or not isinstance(self.num_routers, int) or self.num_routers < 0:
            raise ValueError(f"num_routers must be an integer >= 0, got {self.num_routers!r}")
        if self.reconcile_interval_s <= 0:
            raise ValueError(f"reconcile_interval_s must be positive, got {self.reconcile_interval_s}")
        if self.redis_check_interval_s <= 0:
            raise ValueError(f"redis_check_interval_s must be positive, got {self.redis_check_interval_s}")
        if self.rebalance_interval_s < 0:
            raise ValueError(f"rebalance_interval_s must be >= 0 (0 disables), got {self.rebalance_interval_s}")
        check_tls_files(self.tls_cert_file, self.tls_key_file)
        if self.router.tls_cert_file or self.router.tls_key_file:
            # One pair for the admin API and the routers the control plane starts, as `raylane up --tls-cert` sets.
            raise ValueError("router.tls_cert_file: set tls_cert_file and tls_key_file at the top level instead")

    def router_config(self, index: int) -> RouterConfig:
        """The config of router replica `index`: the `router` tree, its ports offset by `index`, the top-level TLS."""
        r = self.router
        return dataclasses.replace(
            r,
            port=r.port + index if r.port else 0,
            http_port=replica_http_port(r.http_port, index),
            metrics_port=replica_http_port(r.metrics_port, index),
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
        )

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> ControlPlaneConfig:
        """Build from YAML-shaped data (a `router:` section included); `ValueError`s name the key path."""
        return config_tree.from_dict(cls, data, path, moved=MOVED_KEYS)

    def to_dict(self) -> dict[str, Any]:
        """The whole tree as YAML-shaped data (the admin token left out); `from_dict` turns it back."""
        data = config_tree.to_dict(self)
        data.pop("admin_token")
        return data

    @classmethod
    def load(cls, file: str | Path | None = None, **overrides: Any) -> ControlPlaneConfig:
        """Defaults, then `RAYLANE_*` environment variables, then a YAML file, then explicit overrides.

        Top-level fields read `RAYLANE_<FIELD>`; nested ones `RAYLANE_<SECTION>__<FIELD>`, e.g.
        `RAYLANE_ROUTER__POLICY` or `RAYLANE_ROUTER__ADMISSION__ENABLED=true` (lists, such as the length
        predictor's `backoff`, come from the file only). Overrides are top-level keys; a mapping value (e.g.
        `router={"port": 0}`) merges into its section key by key, as a file's section does.
        """
        values = _from_environment(os.environ)
        if file is not None:
            data = yaml.safe_load(Path(file).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{file}: a cluster config must be a YAML mapping")
            values = config_tree.deep_merge(values, data)
        values = config_tree.deep_merge(values, {k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.from_dict(values)
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}" if file is not None else str(exc)) from None


MOVED_KEYS = {
    "router_host": "router.host",
    "router_port": "router.port",
    "router_http_port": "router.http_port",
    "router_metrics_port": "router.metrics_port",
    "router_policy": "router.policy",
    "router_admission": "router.admission.enabled",
    "router_max_failovers": "router.failover.max_failovers",
    "auth_max_failures": "auth_limit.max_failures (admin API) and router.auth_limit.max_failures (routers)",
    "auth_failure_window_s": "auth_limit.window_s (admin API) and router.auth_limit.window_s (routers)",
}
"""Flat keys of the cluster config before the router section, and where they live now."""


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The `RAYLANE_*` variables that name a field of the tree, as nested YAML-shaped data."""
    values: dict[str, Any] = {}
    for old, new in MOVED_KEYS.items():
        if ENV_PREFIX + old.upper() in environ:
            name = ENV_PREFIX + new.split(" ", 1)[0].replace(".", "__").upper()
            raise ValueError(f"{ENV_PREFIX}{old.upper()} is gone: set {name} ({new})")
    for key_path, tp in config_tree.leaf_fields(ControlPlaneConfig):
        name = ENV_PREFIX + "__".join(key_path).upper()
        raw = environ.get(name)
        if raw is None:
            continue
        node = values
        for key in key_path[:-1]:
            node = node.setdefault(key, {})
        node[key_path[-1]] = config_tree.parse_text(tp, raw, name)
    return values


def admin_token_from_env() -> str | None:
    """`RAYLANE_ADMIN_TOKEN`, for admin clients (the CLI) that have no state directory with the token in it."""
    return os.environ.get(ENV_PREFIX + "ADMIN_TOKEN") or None


def tls_ca_file_from_env() -> str | None:
    """`RAYLANE_TLS_CA_FILE`: the CA (or self-signed certificate) CLI clients trust; unset: plaintext."""
    return os.environ.get(ENV_PREFIX + "TLS_CA_FILE") or None

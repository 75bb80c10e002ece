"""`RouterConfig`: one router replica's whole configuration, every sub-config nested in one tree.

The same tree comes from `raylane router serve --config`, from the `router:` section of the cluster config
(`ControlPlaneConfig.router`, for the routers the control plane starts) and from the Helm chart's ConfigMap,
so every router runs the settings, and the default policy, written here. No Ray, no servers: plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router import config_tree
from router.admission import AdmissionConfig
from router.auth_limit import AuthLimitConfig
from router.complexity import TierSelectorConfig
from router.dispatch import FailoverConfig
from router.full_policy import RaylanePolicy, RaylanePolicyConfig
from router.grpc_server import check_tls_files
from router.http.limits import HttpLimits
from router.http.ports import check_http_port
from router.length_predictor import LengthPredictorConfig
from router.policy import Policy
from router.registry import DEFAULT_POLICY, make_policy

MOVED_KEYS = {
    "admission_headroom": "admission.headroom",
    "max_failovers": "failover.max_failovers",
    "auth_max_failures": "auth_limit.max_failures",
    "auth_failure_window_s": "auth_limit.window_s",
    "http_max_body_bytes": "http_limits.max_body_bytes",
    "http_header_timeout_s": "http_limits.header_timeout_s",
    "http_body_timeout_s": "http_limits.body_timeout_s",
}
"""Flat keys of the router config before the tree, and where they live now."""


@dataclass(kw_only=True, frozen=True)
class RouterConfig:
    """One router replica: where it listens, how it routes, admits, fails over and limits its edges."""

    host: str = "127.0.0.1"
    """Interface the gRPC (and HTTP, metrics) servers bind; `0.0.0.0` inside Kubernetes."""
    port: int = 50051
    """gRPC port; 0 picks a free one (the bound address is returned by `start`). The control plane's replica i
    listens on `port + i`."""
    http_port: int = 8000
    """Port of the OpenAI-compatible HTTP front (on `host`): 0 turns it off, -1 (`HTTP_FREE_PORT`) binds a free one
    (tests; the bound address is `RouterReplica.http_address`). The control plane's replica i uses `http_port + i`."""
    metrics_port: int = 9091
    """Port of a Prometheus `/metrics` of its own (on `host`; the HTTP front serves `/metrics` too): 0 turns it off,
    -1 binds a free one (see `RouterReplica.metrics_address`). The control plane's replica i uses `metrics_port + i`."""
    tls_cert_file: str | None = None
    """PEM certificate (chain) of the router's gRPC and HTTP ports; with `tls_key_file` they speak only TLS. In a
    cluster config, the top-level `tls_cert_file` covers the control plane's routers."""
    tls_key_file: str | None = None
    """PEM private key matching `tls_cert_file`."""
    policy: str = DEFAULT_POLICY
    """Routing policy by name (router/registry.py); `raylane` is the full length-, prefix- and KV-aware one."""
    raylane: RaylanePolicyConfig = field(default_factory=RaylanePolicyConfig)
    """Weights and sub-configs of the `raylane` policy (used only when `policy` is `raylane`)."""
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    """Predictive KV admission (`enabled`: queue a request rather than overflow a worker's KV)."""
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    """How many workers a request may lose mid-stream before it fails with UNAVAILABLE."""
    tiers: TierSelectorConfig = field(default_factory=TierSelectorConfig)
    """How each tier group's small/large threshold is calibrated."""
    predictor: LengthPredictorConfig = field(default_factory=LengthPredictorConfig)
    """The output-length predictor (a restored snapshot keeps the config it was saved with)."""
    auth_limit: AuthLimitConfig = field(default_factory=AuthLimitConfig)
    """Lockout of addresses that keep failing authentication, on the gRPC and HTTP ports together."""
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    """Body size and slow-client limits of the HTTP front."""
    table_refresh_s: float = 0.5
    """How often the routing table is pulled from the control plane."""
    stats_refresh_s: float = 0.1
    """How often every worker's load is pulled; placement reads stats at most this old."""
    stats_timeout_s: float = 2.0
    """A stats call taking longer is given up; the worker keeps its last-known load (slow is not dead)."""
    stats_stale_limit_s: float = 30.0
    """A worker whose stats have not answered for this long leaves placement until they do. A stats call that
    fails (the actor or its engine loop died) takes it out at once."""
    predictor_save_s: float = 30.0
    """How often the length predictor is saved to the state store (and at stop); a new router loads the freshest."""

    def __post_init__(self) -> None:
        try:
            make_policy(self.policy)  # a typo fails here, at startup, with the list of names
        except ValueError as exc:
            raise ValueError(f"policy: {exc}") from None
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        check_http_port("http_port", self.http_port)
        check_http_port("metrics_port", self.metrics_port)
        if min(self.table_refresh_s, self.stats_refresh_s, self.stats_timeout_s, self.predictor_save_s) <= 0:
            raise ValueError("refresh intervals and timeouts must be positive")
        if self.stats_stale_limit_s < self.stats_timeout_s:
            raise ValueError(
                f"stats_stale_limit_s ({self.stats_stale_limit_s}) must be >= stats_timeout_s ({self.stats_timeout_s})"
            )
        check_tls_files(self.tls_cert_file, self.tls_key_file)

    def make_policy(self) -> Policy:
        """A fresh instance of the configured policy, with this config's weights for `raylane`."""
        if self.policy == RaylanePolicy.name:
            return RaylanePolicy(self.raylane)
        return make_policy(self.policy)

    @classmethod
    def from_dict(cls, data: Any, path: str = "router") -> RouterConfig:
        """Build from YAML-shaped data; `ValueError`s name the key path (`router.admission.headroom`)."""
        return config_tree.from_dict(cls, data, path, moved=MOVED_KEYS)

    def to_dict(self) -> dict[str, Any]:
        """The whole tree as YAML-shaped data; `from_dict(to_dict())` gives an equal config."""
        return config_tree.to_dict(self)

    @classmethod
    def from_yaml_file(cls, file: str | Path) -> RouterConfig:
        """A router YAML (these keys), or a cluster YAML whose `router:` section it reads (the Helm ConfigMap)."""
        data = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{file}: a router config must be a YAML mapping")
        if "router" in data:
            section = dict(data["router"] or {})
            # As `ControlPlaneConfig.router_config`: the cluster's TLS pair covers its routers.
            for key in ("tls_cert_file", "tls_key_file"):
                if data.get(key) is not None:
                    section.setdefault(key, data[key])
            return cls.from_dict(section, "router")
        return cls.from_dict(data, "")

"""Simulator configuration: one frozen dataclass per part, loadable from YAML (`raylane sim run CONFIG.yaml`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from control_plane.migration_policy import MigrationPolicyConfig
from router.admission import AdmissionConfig
from router.registry import POLICIES
from router.trace import TraceRequest
from sim.cost import CostModel, LinearCostModel
from sim.cost_roofline import LinkModel, RooflineCostModel
from sim.traces import (
    SyntheticTrace,
    load_any,
    load_azure,
    load_burstgpt,
    load_mooncake,
    overlay,
    scale_rate,
    slice_time,
)

ROLES = ("mixed", "prefill", "decode")
TRACE_LOADERS = {"auto": load_any, "azure": load_azure, "burstgpt": load_burstgpt, "mooncake": load_mooncake}
DEFAULT_COST_MODEL: Mapping[str, Any] = {"kind": "roofline", "gpu": "H100", "model": "llama-3-8b", "tp": 1}


@dataclass(kw_only=True, frozen=True)
class TraceConfig:
    """Where requests come from and how the trace is reshaped."""

    path: str | None = None
    """Trace file (CSV or Mooncake JSONL); None means `synthetic` must be set."""
    format: str = "auto"
    """`auto` (from the file), `azure`, `burstgpt` or `mooncake`."""
    rate_scale: float = 1.0
    """Arrival rate multiplier (gaps divided by it), applied after slicing."""
    start_s: float = 0.0
    """Slice start, seconds into the (unscaled) trace."""
    duration_s: float | None = None
    """Slice length in unscaled trace seconds; None keeps the rest."""
    max_requests: int | None = None
    """Keep at most this many requests (the first ones)."""
    overlay_copies: int = 1
    """Merge this many time-rotated copies of the trace (rate x copies over the same span), before slicing."""
    seed: int = 0
    """Seeds the overlay rotations."""
    synthetic: Mapping[str, Any] | None = None
    """Fields of `SyntheticTrace` when there is no `path`."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("trace needs exactly one of `path` and `synthetic`")
        if self.format not in TRACE_LOADERS:
            raise ValueError(f"trace format must be one of {', '.join(TRACE_LOADERS)}, got {self.format!r}")
        if not self.rate_scale > 0:
            raise ValueError(f"rate_scale must be > 0, got {self.rate_scale}")

    def load(self) -> list[TraceRequest]:
        if self.synthetic is not None:
            requests = SyntheticTrace(**self.synthetic).generate()
        else:
            requests = TRACE_LOADERS[self.format](self.path)
        end = self.start_s + self.duration_s if self.duration_s is not None else float("inf")
        requests = overlay(requests, self.overlay_copies, seed=self.seed, window=(self.start_s, end))
        requests = slice_time(requests, self.start_s, self.duration_s)
        if self.rate_scale != 1.0:
            requests = scale_rate(requests, self.rate_scale)
        return requests[: self.max_requests] if self.max_requests is not None else requests


@dataclass(kw_only=True, frozen=True)
class PoolConfig:
    """A group of identical workers in one role."""

    role: str
    """`mixed` (prefill and decode together), `prefill` or `decode`."""
    num_workers: int
    """Workers (each one TP group) in the pool."""
    cost_model: Mapping[str, Any] | None = None
    """Overrides the simulation's cost model for this pool."""
    kv_blocks: int | None = None
    """KV pool per worker in blocks; None derives it from the cost model's memory (roofline) or the sim default."""
    max_batched_tokens: int | None = None
    """Overrides the engine token budget for this pool (prefill pools often run larger chunks)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"pool role must be one of {ROLES}, got {self.role!r}")
        if self.num_workers < 1:
            raise ValueError(f"a pool needs num_workers >= 1, got {self.num_workers}")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError(f"kv_blocks must be >= 1, got {self.kv_blocks}")


@dataclass(kw_only=True, frozen=True)
class SloConfig:
    """Latency targets a request must meet to count toward goodput."""

    ttft_s: float = 1.0
    """Time to first token."""
    tpot_s: float = 0.1
    """Mean time per output token after the first."""

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLOs must be > 0, got ttft_s={self.ttft_s} tpot_s={self.tpot_s}")


@dataclass(kw_only=True, frozen=True)
class MigrationConfig:
    """Periodic rebalancing of decoding requests between workers of one role, by the production policy
    (`control_plane/migration_policy.plan_rebalance`, fed predicted remaining lengths)."""

    enabled: bool = False
    """Run the migration policy every `interval_s`."""
    interval_s: float = 0.5
    """Seconds between policy ticks (the control plane's rebalancer period)."""
    policy: MigrationPolicyConfig = field(default_factory=MigrationPolicyConfig)
    """The production policy's knobs: imbalance threshold, headroom, per-worker rate limit, moves per round."""

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"migration needs interval_s > 0, got {self.interval_s}")


@dataclass(kw_only=True, frozen=True)
class FailureConfig:
    """One worker failure: its requests restart elsewhere by recompute."""

    worker_id: str
    """e.g. `mixed-3`."""
    at_s: float
    """Simulated time of the failure."""
    recover_after_s: float | None = None
    """Seconds until it rejoins empty; None: never."""


@dataclass(kw_only=True, frozen=True)
class SimConfig:
    """A whole simulation: trace, cluster, policy, cost model, engine limits and SLOs."""

    trace: TraceConfig | None = None
    """Where requests come from (ignored when `requests` is given)."""
    requests: tuple[TraceRequest, ...] | None = None
    """An explicit request list, e.g. from a test or the validation bench."""
    pools: tuple[PoolConfig, ...] = (PoolConfig(role="mixed", num_workers=1),)
    """Worker pools; use either mixed pools or prefill plus decode pools."""
    policy: str = "least_outstanding"
    """Routing policy, by its name in `router/registry.py`."""
    cost_model: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_COST_MODEL))
    """`{kind: roofline, gpu, model, tp}`, `{kind: profiled, path}` or `{kind: linear, a, b, c, d, e}`."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_blocks: int | None = None
    """Default KV blocks per worker when neither the pool nor the cost model sets it."""
    kv_memory_utilization: float = 0.9
    """Share of GPU memory weights plus KV may use when the roofline model sizes the KV pool."""
    max_batched_tokens: int = 2048
    """Engine token budget per step (chunked prefill fills what decodes leave)."""
    chunked_prefill: bool = True
    """Sarathi-style chunks that share steps with decodes; False schedules whole prompts first, decodes wait
    (vLLM v0's default), for comparison."""
    max_num_seqs: int = 256
    """Requests in a worker's batch at most."""
    max_tokens: int = 4096
    """The requests' output cap as the router sees it; trace outputs are clipped to it."""
    kv_bytes_per_token: int | None = None
    """KV bytes per token for transfers; None takes it from the roofline model config (0 for other cost models)."""
    link_bandwidth_gb_s: float = 50.0
    """KV-transfer link bandwidth between workers, GB/s (default 400 Gb/s RDMA)."""
    link_latency_s: float = 20e-6
    """KV-transfer setup latency."""
    slo: SloConfig = SloConfig()
    """Targets for attainment and goodput."""
    use_length_predictor: bool | None = None
    """Feed the router's length predictor to policies; None: for length-aware policies (`raylane`), admission and
    migration (which read predicted lengths)."""
    ledger_refresh_s: float = 0.05
    """How stale the token counts in the router's KV ledger may get before a view rebuilds it (speed knob)."""
    migration: MigrationConfig = MigrationConfig()
    """Decode-time rebalancing."""
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    """Predictive admission as the router runs it, with `enabled` (off by default): a request that does not fit
    waits, FIFO, until a finish frees room; the simulator never refuses one, so only `headroom` and `use_p90` matter."""
    failures: tuple[FailureConfig, ...] = ()
    """Injected worker failures."""
    sample_interval_s: float = 1.0
    """Period of the queue and KV time series."""
    seed: int = 0
    """Seeds everything random (synthetic traces, sampled policies)."""
    deployment: str = "sim"
    """Deployment name the policies see."""

    def __post_init__(self) -> None:
        if self.trace is None and self.requests is None:
            raise ValueError("SimConfig needs a trace or a request list")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(sorted(POLICIES))}")
        roles = {p.role for p in self.pools}
        if roles not in ({"mixed"}, {"prefill", "decode"}):
            raise ValueError(f"pools must be all mixed, or prefill plus decode; got roles {sorted(roles)}")
        for name in ("block_size", "max_batched_tokens", "max_num_seqs", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0 < self.kv_memory_utilization <= 1 and self.sample_interval_s > 0):
            raise ValueError("need 0 < kv_memory_utilization <= 1 and sample_interval_s > 0")
        make_cost_model(self.cost_model)  # fail early on a bad spec

    @property
    def link(self) -> LinkModel:
        return LinkModel(bandwidth_bytes_per_s=self.link_bandwidth_gb_s * 1e9, latency_s=self.link_latency_s)

    def load_requests(self) -> list[TraceRequest]:
        if self.requests is not None:
            return sorted(self.requests, key=lambda r: r.arrival_s)
        assert self.trace is not None
        return self.trace.load()


def make_cost_model(spec: Mapping[str, Any]) -> CostModel:
    """A cost model from its config mapping (see `SimConfig.cost_model`)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "roofline":
        return RooflineCostModel(**spec)
    if kind == "linear":
        return LinearCostModel(**spec)
    if kind == "profiled":
        from sim.cost_profiled import ProfiledCostModel  # helper V's module

        if "path" not in spec:
            raise ValueError("a profiled cost model needs `path` (from `raylane sim profile`)")
        return ProfiledCostModel.load(spec["path"])
    raise ValueError(f"cost_model kind must be roofline, linear or profiled, got {kind!r}")


def worker_gpus(spec: Mapping[str, Any]) -> int:
    """GPUs one worker of this cost model occupies (its TP degree; 1 for non-GPU models)."""
    return int(spec.get("tp", 1)) if spec.get("kind") == "roofline" else 1


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**data)


def config_from_dict(data: Mapping[str, Any], *, base_dir: Path | None = None) -> SimConfig:
    """A `SimConfig` from a YAML-shaped mapping; relative trace/profile paths resolve against `base_dir`."""
    data = dict(data)

    def resolve(path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() or base_dir is None or not (base_dir / p).exists() else base_dir / p)

    if "trace" in data:
        trace = dict(data["trace"])
        if trace.get("path"):
            trace["path"] = resolve(trace["path"])
        data["trace"] = _build(TraceConfig, trace, "trace")
    if "cost_model" in data and data["cost_model"].get("path"):
        data["cost_model"] = {**data["cost_model"], "path": resolve(data["cost_model"]["path"])}
    data["pools"] = tuple(_build(PoolConfig, p, "pools[]") for p in data.get("pools", ()))
    if "slo" in data:
        data["slo"] = _build(SloConfig, data["slo"], "slo")
    if "migration" in data:
        migration = dict(data["migration"])
        if "policy" in migration:
            migration["policy"] = _build(MigrationPolicyConfig, migration["policy"], "migration.policy")
        data["migration"] = _build(MigrationConfig, migration, "migration")
    if "admission" in data:
        data["admission"] = _build(AdmissionConfig, data["admission"], "admission")
    data["failures"] = tuple(_build(FailureConfig, f, "failures[]") for f in data.get("failures", ()))
    return _build(SimConfig, data, "config")


def load_config(path: str | Path) -> SimConfig:
    """Read a YAML config file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"config {path} must be a YAML mapping")
    return config_from_dict(data, base_dir=path.parent)

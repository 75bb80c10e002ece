"""Desired-state types: deployments (pools, engine options, SLOs, adapters) and tenants (quotas).

Every type is a frozen dataclass that validates itself in `__post_init__` and round-trips through
`to_dict()` / `from_dict()`. Errors are `SpecError`s whose message starts with the path of the
offending field, e.g. `deployment.pools[0].role: must be one of prefill, decode, mixed, got 'decoder'`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from workers.engine.config import DEPLOYMENT_FIELDS, EngineConfig

ROLES = ("prefill", "decode", "mixed")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TIERS = ("small", "large")
NAME_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_YAML_CHARS = 64 * 1024
"""A spec is a few hundred bytes; PyYAML's scanner is quadratic in flow nesting (1 MB of `[` takes minutes)."""
_VALUE_REPR = reprlib.Repr()
"""Bounds a bad value quoted in an error: YAML aliases can make a small file a list of 10^9 items."""
_VALUE_REPR.maxlevel, _VALUE_REPR.maxlist, _VALUE_REPR.maxdict = 2, 6, 6
_VALUE_REPR.maxstring = _VALUE_REPR.maxother = 80


class SpecError(ValueError):
    """Bad spec; message starts with the field path, e.g. 'pools[1].replicas: must be >= 0, got -1'."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        # A single argument is taken as a whole message without a path.
        if reason is None:
            path, reason = "", path
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)

    def under(self, prefix: str) -> SpecError:
        """The same error, seen from a parent object at `prefix`."""
        return SpecError(_join(prefix, self.path), self.reason)


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {_VALUE_REPR.repr(value)}"


def _check_int(path: str, value: Any, *, minimum: int) -> None:
    # bool is an int subclass, but `replicas: true` is a typo, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"must be an integer, got {_describe(value)}")
    if value < minimum:
        raise SpecError(path, f"must be >= {minimum}, got {value}")


def _check_float(obj: Any, name: str, *, positive: bool, optional: bool = False) -> None:
    """Check a float field in place, widening ints (YAML writes `1`, not `1.0`)."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(name, f"must be a finite number, got {_describe(value)}")
    if positive and value <= 0:
        raise SpecError(name, f"must be > 0, got {value}")
    if value < 0:
        raise SpecError(name, f"must be >= 0, got {value}")
    object.__setattr__(obj, name, float(value))


def _check_name(path: str, value: Any) -> None:
    if not isinstance(value, str):
        raise SpecError(path, f"must be a string, got {_describe(value)}")
    if not NAME_PATTERN.fullmatch(value):
        raise SpecError(
            path,
            f"must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit, got {value!r}",
        )


def _check_text(path: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(path, f"must be a non-empty string, got {_describe(value)}")


def _check_choice(path: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(path, f"must be one of {', '.join(choices)}, got {value!r}")


def _check_items(obj: Any, name: str, item_type: type) -> None:
    """Check a tuple-of-specs field in place, accepting a list (callers build them in loops)."""
    value = getattr(obj, name)
    if not isinstance(value, list | tuple):
        raise SpecError(name, f"must be a list, got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, item_type):
            raise SpecError(f"{name}[{i}]", f"must be a {item_type.__name__}, got {type(item).__name__}")
    object.__setattr__(obj, name, tuple(value))


def _from_mapping(cls: type, data: Any, path: str, nested: Mapping[str, Callable[[Any, str], Any]] | None = None):
    """Build `cls` from a mapping: unknown and missing keys are reported with their path, and
    validation errors raised by the constructor are re-rooted at `path`."""
    if not isinstance(data, Mapping):
        raise SpecError(path, f"must be a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f" (allowed: {', '.join(fields)})"
            raise SpecError(_join(path, str(key)), f"unknown key{suggestion}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise SpecError(_join(path, name), "required")
    nested = nested or {}
    kwargs = {key: nested[key](value, _join(path, key)) if key in nested else value for key, value in data.items()}
    try:
        return cls(**kwargs)
    except SpecError as err:
        raise err.under(path) from None


def _list_of(item_from_dict: Callable[[Any, str], Any]) -> Callable[[Any, str], tuple]:
    def build(value: Any, path: str) -> tuple:
        if not isinstance(value, list | tuple):
            raise SpecError(path, f"must be a list, got {_describe(value)}")
        return tuple(item_from_dict(item, f"{path}[{i}]") for i, item in enumerate(value))

    return build


@dataclass(kw_only=True, frozen=True)
class PoolSpec:
    """A pool of identical workers in one role."""

    role: str
    """One of ROLES: 'prefill' and 'decode' form a disaggregated pair, 'mixed' does both."""
    replicas: int = 1
    """Desired number of workers; 0 scales the pool to zero."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for each worker."""
    num_gpus: float = 0.0
    """GPUs Ray reserves for each worker; fractions share a GPU."""

    def __post_init__(self) -> None:
        _check_choice("role", self.role, ROLES)
        _check_int("replicas", self.replicas, minimum=0)
        _check_float(self, "num_cpus", positive=True)
        _check_float(self, "num_gpus", positive=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> PoolSpec:
        return _from_mapping(cls, d, path)


class _EngineOptionsMethods:
    """Validation and conversions of `EngineOptions`, whose fields are generated from `EngineConfig`."""

    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = (
        "block_size",
        "kv_cache_bytes",
        "max_num_batched_tokens",
        "max_num_seqs",
        "max_loras",
        "max_lora_rank",
    )
    """Options that must be >= 1 in a deployment (an engine alone may run without LoRA slots)."""

    def __post_init__(self) -> None:
        for name, tp in typing.get_type_hints(EngineConfig).items():
            if name not in DEPLOYMENT_FIELDS:
                continue
            value = getattr(self, name)
            if tp is bool and not isinstance(value, bool):
                raise SpecError(name, f"must be true or false, got {_describe(value)}")
            if tp is int:
                _check_int(name, value, minimum=1 if name in self.POSITIVE_FIELDS else 0)
        if self.block_size & (self.block_size - 1):
            raise SpecError("block_size", f"must be a power of two, got {self.block_size}")
        try:  # the engine's own cross-field rules (e.g. max_num_seqs <= max_num_batched_tokens), at apply time
            self.engine_config(model="<deployment>")
        except ValueError as exc:
            message = str(exc)
            name = message.split(" ", 1)[0]
            raise SpecError(name if name in DEPLOYMENT_FIELDS else "", message) from None

    def engine_config(self, *, model: str, **settings: Any) -> EngineConfig:
        """The `EngineConfig` every worker of the deployment runs: these options plus `model` and `settings`."""
        return EngineConfig(model=model, **self.to_dict(), **settings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> EngineOptions:
        return _from_mapping(cls, d, path)


def _engine_option_fields() -> list[tuple[str, Any, Any]]:
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    hints = typing.get_type_hints(EngineConfig)
    return [(name, hints[name], field(default=defaults[name])) for name in DEPLOYMENT_FIELDS]


EngineOptions = dataclasses.make_dataclass(
    "EngineOptions",
    _engine_option_fields(),
    bases=(_EngineOptionsMethods,),
    kw_only=True,
    frozen=True,
)
EngineOptions.__module__ = __name__  # pickles by name (make_dataclass takes `module=` only from Python 3.12)
EngineOptions.__doc__ = """Options passed to every worker's engine: `DEPLOYMENT_FIELDS` of `EngineConfig`
(workers/engine/config.py), with its types, defaults and docs; `engine_config` builds the engine's config."""


@dataclass(kw_only=True, frozen=True)
class SloTargets:
    """Latency targets the autoscaler scales against; None means no target."""

    ttft_ms_p99: float | None = None
    """p99 time to first token, in milliseconds."""
    tpot_ms_p99: float | None = None
    """p99 time per output token after the first, in milliseconds."""

    def __post_init__(self) -> None:
        _check_float(self, "ttft_ms_p99", positive=True, optional=True)
        _check_float(self, "tpot_ms_p99", positive=True, optional=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> SloTargets:
        return _from_mapping(cls, d, path)


@dataclass(kw_only=True, frozen=True)
class AdapterSpec:
    """A LoRA adapter that one tenant may use on one deployment."""

    name: str
    """Adapter name, unique within its deployment; requests select it by this name."""
    path: str
    """Folder of the PEFT-format adapter (not checked for existence here)."""
    tenant: str
    """The only tenant allowed to use the adapter."""
    deployment: str
    """The deployment whose workers load the adapter."""

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        _check_text("path", self.path)
        _check_name("tenant", self.tenant)
        _check_name("deployment", self.deployment)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> AdapterSpec:
        return _from_mapping(cls, d, path)


@dataclass(kw_only=True, frozen=True)
class DeploymentSpec:
    """One served model: its pools per role, engine options, SLOs and inline adapters."""

    name: str
    """Deployment name; clients select the model by it."""
    model: str
    """Path of the HF-format model folder (not checked for existence here)."""
    dtype: str = "auto"
    """Weight and activation dtype: one of DTYPES; 'auto' takes the checkpoint's."""
    pools: tuple[PoolSpec, ...]
    """Either one 'mixed' pool, or a 'prefill' and a 'decode' pool."""
    adapters: tuple[AdapterSpec, ...] = ()
    """Adapters declared with the deployment; each one's `deployment` must be this name."""
    engine: EngineOptions = field(default_factory=EngineOptions)
    """Engine options for every worker of the deployment."""
    slo: SloTargets = field(default_factory=SloTargets)
    """Latency targets for the autoscaler."""
    group: str = ""
    """Tier group: deployments sharing it serve one task with a small and a large model; clients may address
    the group and the router picks the tier by prompt complexity. Empty: not in a group."""
    tier: str = ""
    """`small` or `large` within `group`; empty exactly when `group` is."""

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        if self.group or self.tier:
            _check_name("group", self.group)
            _check_choice("tier", self.tier, TIERS)
            if self.group == self.name:
                raise SpecError("group", f"must differ from the deployment's own name {self.name!r}")
        _check_text("model", self.model)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_items(self, "pools", PoolSpec)
        _check_items(self, "adapters", AdapterSpec)
        if not isinstance(self.engine, EngineOptions):
            raise SpecError("engine", f"must be an EngineOptions, got {type(self.engine).__name__}")
        if not isinstance(self.slo, SloTargets):
            raise SpecError("slo", f"must be a SloTargets, got {type(self.slo).__name__}")
        self._check_pools()
        self._check_adapters()

    def _check_pools(self) -> None:
        if not self.pools:
            raise SpecError("pools", "must name at least one pool")
        seen: set[str] = set()
        for i, pool in enumerate(self.pools):
            if pool.role in seen:
                raise SpecError(f"pools[{i}].role", f"duplicate role {pool.role!r}; each role has one pool")
            seen.add(pool.role)
        if "mixed" in seen and seen & {"prefill", "decode"}:
            raise SpecError("pools", "a 'mixed' pool cannot be combined with 'prefill' or 'decode' pools")
        for role, partner in (("prefill", "decode"), ("decode", "prefill")):
            if role in seen and partner not in seen:
                raise SpecError("pools", f"a {role!r} pool needs a {partner!r} pool to hand requests to")

    def _check_adapters(self) -> None:
        seen: set[str] = set()
        for i, adapter in enumerate(self.adapters):
            if adapter.deployment != self.name:
                raise SpecError(
                    f"adapters[{i}].deployment",
                    f"must equal the deployment name {self.name!r}, got {adapter.deployment!r}",
                )
            if adapter.name in seen:
                raise SpecError(f"adapters[{i}].name", f"duplicate adapter {adapter.name!r}")
            seen.add(adapter.name)

    @property
    def is_disaggregated(self) -> bool:
        """True when prefill and decode run in separate pools (KV handed off between them)."""
        return self.pool("prefill") is not None and self.pool("decode") is not None

    def pool(self, role: str) -> PoolSpec | None:
        """The pool for `role`, or None when the deployment has none."""
        return next((p for p in self.pools if p.role == role), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "dtype": self.dtype,
            "pools": [p.to_dict() for p in self.pools],
            "adapters": [a.to_dict() for a in self.adapters],
            "engine": self.engine.to_dict(),
            "slo": self.slo.to_dict(),
            **({"group": self.group, "tier": self.tier} if self.group else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> DeploymentSpec:
        def adapter(value: Any, item_path: str) -> AdapterSpec:
            # Inline adapters may leave out `deployment`: it can only be this one.
            if isinstance(value, Mapping) and "deployment" not in value and isinstance(d, Mapping):
                value = {**value, "deployment": d.get("name")}
            return AdapterSpec.from_dict(value, item_path)

        nested = {
            "pools": _list_of(PoolSpec.from_dict),
            "adapters": _list_of(adapter),
            "engine": EngineOptions.from_dict,
            "slo": SloTargets.from_dict,
        }
        return _from_mapping(cls, d, path, nested)

    @classmethod
    def from_yaml(cls, text: str) -> DeploymentSpec:
        """Parse a deployment from YAML: a mapping, either bare or under a top-level `deployment:` key."""
        data = _load_yaml(text)
        if isinstance(data, Mapping) and "deployment" in data:
            extra = [key for key in data if key != "deployment"]
            if extra:
                raise SpecError(str(extra[0]), "unknown key; only 'deployment' may sit at the top level")
            return cls.from_dict(data["deployment"], "deployment")
        return cls.from_dict(data)


@dataclass(kw_only=True, frozen=True)
class Quota:
    """What one tenant may use at once and per minute."""

    max_concurrent: int = 16
    """Most requests in flight at once."""
    tokens_per_minute: int = 120_000
    """Sustained rate of prompt plus generated tokens (token-bucket refill rate)."""
    burst_tokens: int | None = None
    """Token-bucket capacity; None means `tokens_per_minute`."""

    def __post_init__(self) -> None:
        _check_int("max_concurrent", self.max_concurrent, minimum=1)
        _check_int("tokens_per_minute", self.tokens_per_minute, minimum=1)
        if self.burst_tokens is not None:
            _check_int("burst_tokens", self.burst_tokens, minimum=1)

    @property
    def effective_burst_tokens(self) -> int:
        """The bucket capacity, with the default applied."""
        return self.tokens_per_minute if self.burst_tokens is None else self.burst_tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> Quota:
        return _from_mapping(cls, d, path)


@dataclass(kw_only=True, frozen=True)
class TenantSpec:
    """A customer: owns API keys and adapters, and is held to a quota."""

    name: str
    """Tenant name."""
    quota: Quota = field(default_factory=Quota)
    """Concurrency and rate limits."""

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        if not isinstance(self.quota, Quota):
            raise SpecError("quota", f"must be a Quota, got {type(self.quota).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "quota": self.quota.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> TenantSpec:
        return _from_mapping(cls, d, path, {"quota": Quota.from_dict})


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that rejects duplicate keys, which plain YAML silently resolves to the last one."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str | int | float | bool | None):  # `[a]: 1` parses; no spec has such keys
                raise SpecError(f"line {line}", f"a key must be a plain value, got {type(key).__name__}")
            if key in seen:
                raise SpecError(f"line {line}", f"duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    if not isinstance(text, str):
        raise SpecError(f"YAML text must be a string, got {type(text).__name__}")
    if len(text) > MAX_YAML_CHARS:
        raise SpecError("YAML", f"document is {len(text)} characters; a deployment spec has at most {MAX_YAML_CHARS}")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise SpecError(where, f"invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise SpecError("YAML", f"invalid YAML: {err}") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise SpecError("YAML", "nested too deeply to be a deployment") from None
    if data is None:
        raise SpecError("YAML", "document is empty; expected a deployment mapping")
    return data

"""Protobuf <-> spec dataclasses, at the admin API's edge. Validation happens in the dataclasses."""

from __future__ import annotations

from typing import Any

from control_plane.spec import AdapterSpec, DeploymentSpec, EngineOptions, Quota, TenantSpec
from protos.raylane.v1 import control_pb2


def deployment_from_proto(message: control_pb2.DeploymentSpec) -> DeploymentSpec:
    """The spec a request describes; proto3's zero values mean "use the default"."""
    data: dict[str, Any] = {"name": message.name, "model": message.model, "dtype": message.dtype or "auto"}
    data["pools"] = [
        {"role": p.role, "replicas": p.replicas, "num_cpus": p.num_cpus or 1.0, "num_gpus": p.num_gpus}
        for p in message.pools
    ]
    data["adapters"] = [_adapter_dict(a, default_deployment=message.name) for a in message.adapters]
    if message.HasField("engine"):
        defaults = EngineOptions()
        # Proto3 sends 0 for an unset integer; none of these may be 0, so 0 means "the default".
        data["engine"] = {
            name: getattr(message.engine, name) or getattr(defaults, name) for name in EngineOptions.POSITIVE_FIELDS
        }
        if message.engine.HasField("enable_prefix_caching"):
            data["engine"]["enable_prefix_caching"] = message.engine.enable_prefix_caching
        data["engine"]["short_prompt_tokens"] = message.engine.short_prompt_tokens
    if message.HasField("slo"):
        data["slo"] = {"ttft_ms_p99": message.slo.ttft_ms_p99 or None, "tpot_ms_p99": message.slo.tpot_ms_p99 or None}
    if message.group or message.tier:
        data["group"], data["tier"] = message.group, message.tier
    return DeploymentSpec.from_dict(data, "spec")


def deployment_to_proto(spec: DeploymentSpec) -> control_pb2.DeploymentSpec:
    return control_pb2.DeploymentSpec(
        name=spec.name,
        model=spec.model,
        dtype=spec.dtype,
        pools=[
            control_pb2.PoolSpec(role=p.role, replicas=p.replicas, num_cpus=p.num_cpus, num_gpus=p.num_gpus)
            for p in spec.pools
        ],
        adapters=[adapter_to_proto(a) for a in spec.adapters],
        engine=control_pb2.EngineOptions(**spec.engine.to_dict()),
        slo=control_pb2.SloTargets(ttft_ms_p99=spec.slo.ttft_ms_p99 or 0.0, tpot_ms_p99=spec.slo.tpot_ms_p99 or 0.0),
        group=spec.group,
        tier=spec.tier,
    )


def adapter_from_proto(message: control_pb2.AdapterSpec) -> AdapterSpec:
    return AdapterSpec.from_dict(_adapter_dict(message, default_deployment=""), "adapter")


def adapter_to_proto(spec: AdapterSpec) -> control_pb2.AdapterSpec:
    return control_pb2.AdapterSpec(name=spec.name, path=spec.path, tenant=spec.tenant, deployment=spec.deployment)


def tenant_from_proto(message: control_pb2.Tenant) -> TenantSpec:
    defaults = Quota()
    quota = {
        "max_concurrent": message.quota.max_concurrent or defaults.max_concurrent,
        "tokens_per_minute": message.quota.tokens_per_minute or defaults.tokens_per_minute,
        "burst_tokens": message.quota.burst_tokens or None,
    }
    return TenantSpec.from_dict({"name": message.name, "quota": quota}, "tenant")


def tenant_to_proto(spec: TenantSpec) -> control_pb2.Tenant:
    quota = spec.quota
    return control_pb2.Tenant(
        name=spec.name,
        quota=control_pb2.Quota(
            max_concurrent=quota.max_concurrent,
            tokens_per_minute=quota.tokens_per_minute,
            burst_tokens=quota.burst_tokens or 0,
        ),
    )


def _adapter_dict(message: control_pb2.AdapterSpec, *, default_deployment: str) -> dict[str, str]:
    return {
        "name": message.name,
        "path": message.path,
        "tenant": message.tenant,
        "deployment": message.deployment or default_deployment,
    }

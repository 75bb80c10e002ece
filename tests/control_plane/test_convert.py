"""Protobuf <-> spec conversion at the admin API's edge: round trips, zero values, errors with field paths."""

from __future__ import annotations

import pytest

from control_plane import convert
from control_plane.spec import (
    AdapterSpec,
    DeploymentSpec,
    EngineOptions,
    PoolSpec,
    Quota,
    SloTargets,
    SpecError,
    TenantSpec,
)
from protos.raylane.v1 import control_pb2


def full_deployment() -> DeploymentSpec:
    """A deployment with every field away from its default."""
    return DeploymentSpec(
        name="chat",
        model="/models/llama",
        dtype="bfloat16",
        pools=(
            PoolSpec(role="prefill", replicas=2, num_cpus=2.0, num_gpus=0.5),
            PoolSpec(role="decode", replicas=0, num_cpus=1.5, num_gpus=1.0),
        ),
        adapters=(AdapterSpec(name="legal", path="/adapters/legal", tenant="globex", deployment="chat"),),
        engine=EngineOptions(
            block_size=32,
            kv_cache_bytes=5 * 2**30,
            max_num_batched_tokens=1024,
            max_num_seqs=64,
            max_loras=2,
            max_lora_rank=32,
            enable_prefix_caching=False,
        ),
        slo=SloTargets(ttft_ms_p99=250.0, tpot_ms_p99=40.0),
    )


def test_deployment_round_trips_through_proto():
    spec = full_deployment()
    assert convert.deployment_from_proto(convert.deployment_to_proto(spec)) == spec


def test_default_deployment_round_trips_through_proto():
    spec = DeploymentSpec(name="moe", model="/models/mixtral", pools=(PoolSpec(role="mixed"),))
    assert convert.deployment_from_proto(convert.deployment_to_proto(spec)) == spec


def test_deployment_survives_the_wire():
    message = convert.deployment_to_proto(full_deployment())
    assert convert.deployment_from_proto(control_pb2.DeploymentSpec.FromString(message.SerializeToString())) == (
        full_deployment()
    )


def test_tenant_round_trips_through_proto():
    for tenant in (
        TenantSpec(name="acme"),
        TenantSpec(name="globex", quota=Quota(max_concurrent=3, tokens_per_minute=9000, burst_tokens=500)),
    ):
        assert convert.tenant_from_proto(convert.tenant_to_proto(tenant)) == tenant


def test_adapter_round_trips_through_proto():
    adapter = AdapterSpec(name="support", path="/adapters/support", tenant="acme", deployment="chat")
    assert convert.adapter_from_proto(convert.adapter_to_proto(adapter)) == adapter


def test_deployment_zero_values_mean_the_defaults():
    message = control_pb2.DeploymentSpec(
        name="chat", model="/m", pools=[control_pb2.PoolSpec(role="mixed", replicas=1)], slo=control_pb2.SloTargets()
    )
    spec = convert.deployment_from_proto(message)
    assert spec.dtype == "auto"
    assert spec.pools == (PoolSpec(role="mixed", replicas=1, num_cpus=1.0, num_gpus=0.0),)
    assert spec.engine == EngineOptions()
    assert spec.slo == SloTargets()


def test_engine_zero_values_mean_the_defaults_field_by_field():
    message = control_pb2.DeploymentSpec(
        name="chat",
        model="/m",
        pools=[control_pb2.PoolSpec(role="mixed")],
        engine=control_pb2.EngineOptions(block_size=64),
    )
    engine = convert.deployment_from_proto(message).engine
    assert engine == EngineOptions(block_size=64)  # unset prefix caching stays on


def test_prefix_caching_turned_off_explicitly_stays_off():
    message = control_pb2.DeploymentSpec(
        name="chat",
        model="/m",
        pools=[control_pb2.PoolSpec(role="mixed")],
        engine=control_pb2.EngineOptions(enable_prefix_caching=False),
    )
    assert convert.deployment_from_proto(message).engine.enable_prefix_caching is False


def test_zero_replicas_stay_zero_a_pool_scaled_to_zero():
    message = control_pb2.DeploymentSpec(name="chat", model="/m", pools=[control_pb2.PoolSpec(role="mixed")])
    assert convert.deployment_from_proto(message).pools[0].replicas == 0


def test_tenant_zero_quota_values_mean_the_defaults():
    tenant = convert.tenant_from_proto(control_pb2.Tenant(name="acme"))
    assert tenant.quota == Quota()
    assert tenant.quota.burst_tokens is None


def test_inline_adapters_default_to_their_deployment():
    message = control_pb2.DeploymentSpec(
        name="chat",
        model="/m",
        pools=[control_pb2.PoolSpec(role="mixed")],
        adapters=[control_pb2.AdapterSpec(name="legal", path="/a", tenant="globex")],
    )
    assert convert.deployment_from_proto(message).adapters[0].deployment == "chat"


def mixed_pool(**fields) -> control_pb2.PoolSpec:
    return control_pb2.PoolSpec(role="mixed", **fields)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (control_pb2.DeploymentSpec(name="Chat!", model="/m", pools=[mixed_pool()]), "spec.name"),
        (control_pb2.DeploymentSpec(name="chat", pools=[mixed_pool()]), "spec.model"),
        (control_pb2.DeploymentSpec(name="chat", model="/m", dtype="int3", pools=[mixed_pool()]), "spec.dtype"),
        (control_pb2.DeploymentSpec(name="chat", model="/m"), "spec.pools"),
        (
            control_pb2.DeploymentSpec(name="chat", model="/m", pools=[control_pb2.PoolSpec(role="gpu")]),
            "spec.pools[0].role",
        ),
        (
            control_pb2.DeploymentSpec(name="chat", model="/m", pools=[mixed_pool(num_gpus=-1.0)]),
            "spec.pools[0].num_gpus",
        ),
        (
            control_pb2.DeploymentSpec(
                name="chat", model="/m", pools=[mixed_pool()], engine=control_pb2.EngineOptions(block_size=24)
            ),
            "spec.engine.block_size",
        ),
        (
            control_pb2.DeploymentSpec(
                name="chat", model="/m", pools=[mixed_pool()], slo=control_pb2.SloTargets(ttft_ms_p99=-5.0)
            ),
            "spec.slo.ttft_ms_p99",
        ),
        (
            control_pb2.DeploymentSpec(
                name="chat",
                model="/m",
                pools=[mixed_pool()],
                adapters=[control_pb2.AdapterSpec(name="a", path="/a", tenant="Not A Tenant")],
            ),
            "spec.adapters[0].tenant",
        ),
    ],
)
def test_a_bad_deployment_value_raises_spec_error_naming_the_field(message, field):
    with pytest.raises(SpecError) as info:
        convert.deployment_from_proto(message)
    assert info.value.path == field
    assert str(info.value).startswith(f"{field}: ")


def test_a_bad_tenant_value_raises_spec_error_naming_the_field():
    with pytest.raises(SpecError) as info:
        convert.tenant_from_proto(control_pb2.Tenant(name="Bad Name"))
    assert info.value.path == "tenant.name"


def test_a_bad_adapter_value_raises_spec_error_naming_the_field():
    with pytest.raises(SpecError) as info:
        convert.adapter_from_proto(control_pb2.AdapterSpec(name="a", path="", tenant="acme", deployment="chat"))
    assert info.value.path == "adapter.path"
    with pytest.raises(SpecError) as info:
        convert.adapter_from_proto(control_pb2.AdapterSpec(name="a", path="/a", tenant="acme"))
    assert info.value.path == "adapter.deployment"

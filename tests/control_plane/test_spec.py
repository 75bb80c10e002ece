"""Desired-state types: every validation rule, dict/YAML round trips, and error paths."""

from __future__ import annotations

import json

import pytest

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

DISAGG_YAML = """\
deployment:
  name: llama-8b
  model: /models/llama-8b
  dtype: bfloat16
  pools:
    - role: prefill
      replicas: 2
      num_gpus: 1
    - role: decode
      replicas: 4
      num_cpus: 2
      num_gpus: 0.5
  adapters:
    - name: sql
      path: /adapters/sql
      tenant: acme
  engine:
    block_size: 32
    enable_prefix_caching: false
  slo:
    ttft_ms_p99: 500
"""


def mixed(**overrides) -> DeploymentSpec:
    fields = {"name": "llama", "model": "/m", "pools": (PoolSpec(role="mixed"),)}
    return DeploymentSpec(**{**fields, **overrides})


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(SpecError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_yaml_under_deployment_key():
    spec = DeploymentSpec.from_yaml(DISAGG_YAML)
    assert spec.name == "llama-8b" and spec.dtype == "bfloat16"
    assert spec.is_disaggregated
    assert spec.pool("prefill") == PoolSpec(role="prefill", replicas=2, num_gpus=1.0)
    assert spec.pool("decode").num_cpus == 2.0 and isinstance(spec.pool("decode").num_cpus, float)
    assert spec.pool("mixed") is None
    # An inline adapter's deployment defaults to the enclosing deployment.
    assert spec.adapters == (AdapterSpec(name="sql", path="/adapters/sql", tenant="acme", deployment="llama-8b"),)
    assert spec.engine == EngineOptions(block_size=32, enable_prefix_caching=False)
    assert spec.slo == SloTargets(ttft_ms_p99=500.0)


def test_yaml_bare_mapping_uses_defaults():
    spec = DeploymentSpec.from_yaml("name: tiny\nmodel: /m\npools: [{role: mixed}]\n")
    assert spec == mixed(name="tiny")
    assert not spec.is_disaggregated
    assert spec.engine == EngineOptions() and spec.slo == SloTargets() and spec.adapters == ()


def test_round_trip_through_json():
    spec = DeploymentSpec.from_yaml(DISAGG_YAML)
    assert DeploymentSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    tenant = TenantSpec(name="acme", quota=Quota(max_concurrent=2, tokens_per_minute=600, burst_tokens=1200))
    assert TenantSpec.from_dict(json.loads(json.dumps(tenant.to_dict()))) == tenant
    assert TenantSpec.from_dict({"name": "solo"}) == TenantSpec(name="solo")


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "deployment:\n  name: a\n  model: m\n  pools: [{role: decoder}]\n",
            "deployment.pools[0].role: must be one of prefill, decode, mixed, got 'decoder'",
        ),
        (
            "name: a\nmodel: m\npools: [{role: mixed, replica: 2}]\n",
            "pools[0].replica: unknown key; did you mean 'replicas'?",
        ),
        ("name: a\nmodel: m\npools: [{role: mixed}]\ncolour: red\n", "colour: unknown key (allowed: name, model"),
        ("deployment: {name: a, model: m, pools: [{role: mixed}]}\ntenants: []\n", "tenants: unknown key"),
        ("name: a\nmodel: m\npools: [{role: mixed}]\nengine: {blocksize: 8}\n", "engine.blocksize: unknown key"),
        (
            "name: a\nmodel: m\npools: [{role: mixed, replicas: '3'}]\n",
            "pools[0].replicas: must be an integer, got str",
        ),
        ("name: a\nmodel: m\npools: [{role: mixed, replicas: true}]\n", "pools[0].replicas: must be an integer"),
        ("name: a\nmodel: m\npools: {role: mixed}\n", "pools: must be a list, got dict"),
        ("name: a\nmodel: m\npools: [mixed]\n", "pools[0]: must be a mapping, got str 'mixed'"),
        ("name: a\npools: [{role: mixed}]\n", "model: required"),
        ("name: a\nmodel: m\npools: [{replicas: 1}]\n", "pools[0].role: required"),
        (
            "deployment:\n  name: a\n  model: m\n  pools: [{role: mixed}]\n  slo: {ttft_ms_p99: fast}\n",
            "deployment.slo.ttft_ms_p99: must be a finite number",
        ),
        ("- name: a\n", "must be a mapping, got list"),
        ("", "document is empty"),
    ],
)
def test_from_yaml_reports_field_paths(yaml_text, expected):
    assert expected in error_of(DeploymentSpec.from_yaml, yaml_text)


def test_yaml_syntax_error_names_the_line():
    text = "name: a\nmodel: m\npools:\n  - role: mixed\n    replicas: [1, 2\n"
    message = error_of(DeploymentSpec.from_yaml, text)
    assert message.startswith("line ") and "invalid YAML" in message
    bad_indent = "name: a\nmodel: m\n  pools: x\n"
    assert error_of(DeploymentSpec.from_yaml, bad_indent).startswith("line 3,")


def test_yaml_duplicate_key_names_the_line():
    assert error_of(DeploymentSpec.from_yaml, "name: a\nmodel: m\nname: b\n") == "line 3: duplicate key 'name'"


@pytest.mark.parametrize("name", ["a", "llama-3-8b", "0", "a" * 63])
def test_valid_names(name):
    assert mixed(name=name).name == name
    assert TenantSpec(name=name).name == name


@pytest.mark.parametrize("name", ["", "Llama", "-a", "a-", "a_b", "a.b", "a" * 64, 7, None])
def test_invalid_names(name):
    assert error_of(mixed, name=name).startswith("name: must be")
    assert error_of(TenantSpec, name=name).startswith("name: must be")
    assert error_of(AdapterSpec, name="x", path="/p", tenant=name, deployment="d").startswith("tenant: must be")


@pytest.mark.parametrize(
    ("pools", "expected"),
    [
        ((), "pools: must name at least one pool"),
        ((PoolSpec(role="mixed"), PoolSpec(role="mixed")), "pools[1].role: duplicate role 'mixed'"),
        ((PoolSpec(role="prefill"),), "pools: a 'prefill' pool needs a 'decode' pool"),
        ((PoolSpec(role="decode"),), "pools: a 'decode' pool needs a 'prefill' pool"),
        (
            (PoolSpec(role="mixed"), PoolSpec(role="prefill"), PoolSpec(role="decode")),
            "pools: a 'mixed' pool cannot be combined",
        ),
        ((PoolSpec(role="mixed"), PoolSpec(role="decode")), "pools: a 'mixed' pool cannot be combined"),
        (({"role": "mixed"},), "pools[0]: must be a PoolSpec, got dict"),
        ("mixed", "pools: must be a list, got str"),
    ],
)
def test_pool_combination_rules(pools, expected):
    assert error_of(mixed, pools=pools).startswith(expected)


def test_pools_given_as_list_become_a_tuple():
    spec = mixed(pools=[PoolSpec(role="prefill"), PoolSpec(role="decode", replicas=0)])
    assert isinstance(spec.pools, tuple) and spec.is_disaggregated
    assert hash(spec) == hash(mixed(pools=(PoolSpec(role="prefill"), PoolSpec(role="decode", replicas=0))))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"role": "train"}, "role: must be one of prefill, decode, mixed, got 'train'"),
        ({"replicas": -1}, "replicas: must be >= 0, got -1"),
        ({"replicas": 1.5}, "replicas: must be an integer, got float 1.5"),
        ({"num_cpus": 0}, "num_cpus: must be > 0, got 0"),
        ({"num_cpus": float("nan")}, "num_cpus: must be a finite number"),
        ({"num_gpus": -0.5}, "num_gpus: must be >= 0, got -0.5"),
        ({"num_gpus": "1"}, "num_gpus: must be a finite number, got str '1'"),
    ],
)
def test_pool_field_rules(fields, expected):
    assert error_of(PoolSpec, **{"role": "mixed", **fields}).startswith(expected)


def test_pool_error_path_inside_a_deployment():
    data = {"name": "a", "model": "m", "pools": [{"role": "mixed"}, {"role": "decode", "replicas": -1}]}
    assert error_of(DeploymentSpec.from_dict, data) == "pools[1].replicas: must be >= 0, got -1"
    assert error_of(DeploymentSpec.from_dict, data, "spec").startswith("spec.pools[1].replicas:")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"model": ""}, "model: must be a non-empty string"),
        ({"dtype": "fp8"}, "dtype: must be one of auto, float32, bfloat16, float16, got 'fp8'"),
        ({"engine": {"block_size": 16}}, "engine: must be an EngineOptions, got dict"),
        ({"slo": None}, "slo: must be a SloTargets, got NoneType"),
    ],
)
def test_deployment_field_rules(fields, expected):
    assert error_of(mixed, **fields).startswith(expected)


@pytest.mark.parametrize("name", EngineOptions.POSITIVE_FIELDS)
@pytest.mark.parametrize("value", [0, -4])
def test_engine_values_must_be_positive(name, value):
    assert error_of(EngineOptions, **{name: value}) == f"{name}: must be >= 1, got {value}"


@pytest.mark.parametrize("block_size", [3, 12, 48])
def test_block_size_power_of_two(block_size):
    assert error_of(EngineOptions, block_size=block_size) == f"block_size: must be a power of two, got {block_size}"
    assert EngineOptions(block_size=1).block_size == 1 and EngineOptions(block_size=64).block_size == 64


def test_engine_prefix_caching_flag_is_a_bool():
    assert error_of(EngineOptions, enable_prefix_caching="yes").startswith("enable_prefix_caching: must be true or")


@pytest.mark.parametrize("field", ["ttft_ms_p99", "tpot_ms_p99"])
def test_slo_targets_positive_or_none(field):
    assert error_of(SloTargets, **{field: 0}) == f"{field}: must be > 0, got 0"
    assert getattr(SloTargets(**{field: 200}), field) == 200.0


def test_inline_adapter_must_name_this_deployment():
    other = AdapterSpec(name="sql", path="/p", tenant="acme", deployment="other")
    assert (
        error_of(mixed, adapters=(other,))
        == "adapters[0].deployment: must equal the deployment name 'llama', got 'other'"
    )
    data = mixed().to_dict() | {"adapters": [other.to_dict()]}
    assert error_of(DeploymentSpec.from_dict, data, "deployment").startswith("deployment.adapters[0].deployment:")


def test_inline_adapter_names_unique():
    adapter = AdapterSpec(name="sql", path="/p", tenant="acme", deployment="llama")
    assert error_of(mixed, adapters=(adapter, adapter)) == "adapters[1].name: duplicate adapter 'sql'"


def test_adapter_path_required():
    assert error_of(AdapterSpec, name="a", path=" ", tenant="t", deployment="d").startswith("path: must be")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_concurrent": 0}, "max_concurrent: must be >= 1, got 0"),
        ({"tokens_per_minute": -1}, "tokens_per_minute: must be >= 1, got -1"),
        ({"burst_tokens": 0}, "burst_tokens: must be >= 1, got 0"),
        ({"burst_tokens": "lots"}, "burst_tokens: must be an integer, got str 'lots'"),
    ],
)
def test_quota_rules(fields, expected):
    assert error_of(Quota, **fields) == expected
    assert error_of(TenantSpec.from_dict, {"name": "t", "quota": fields}, "tenant") == f"tenant.quota.{expected}"


def test_quota_burst_defaults_to_rate():
    assert Quota(tokens_per_minute=600).effective_burst_tokens == 600
    assert Quota(tokens_per_minute=600, burst_tokens=50).effective_burst_tokens == 50


def test_spec_error_is_a_value_error_with_parts():
    with pytest.raises(ValueError) as info:
        PoolSpec(role="mixed", replicas=-1)
    assert (info.value.path, info.value.reason) == ("replicas", "must be >= 0, got -1")
    assert str(SpecError("plain message")) == "plain message"


def test_engine_options_are_the_engine_configs_deployment_fields_with_its_defaults():
    from workers.engine.config import DEPLOYMENT_FIELDS, EngineConfig

    options = EngineOptions()
    assert tuple(options.to_dict()) == DEPLOYMENT_FIELDS
    engine = EngineConfig(model="/m")
    assert all(getattr(options, name) == getattr(engine, name) for name in DEPLOYMENT_FIELDS)  # one default each
    built = EngineOptions(block_size=32, kv_cache_bytes=1 << 20).engine_config(model="/m", dtype="float32")
    assert (built.block_size, built.kv_cache_bytes, built.max_num_seqs) == (32, 1 << 20, engine.max_num_seqs)


def test_engine_options_run_the_engines_own_cross_field_checks_with_a_path():
    message = error_of(EngineOptions, max_num_batched_tokens=64, max_num_seqs=128)
    assert message.startswith("max_num_seqs: max_num_seqs cannot exceed max_num_batched_tokens")
    assert error_of(EngineOptions, block_size=64, max_num_batched_tokens=32).startswith("max_num_batched_tokens: ")


def test_the_admin_proto_carries_every_engine_option():
    from protos.raylane.v1 import control_pb2

    assert set(control_pb2.EngineOptions.DESCRIPTOR.fields_by_name) == set(EngineOptions().to_dict())

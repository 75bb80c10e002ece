"""RouterConfig: one tree holding every router sub-config, from and to YAML-shaped data, and what a replica builds."""

from __future__ import annotations

import pytest
import yaml

from router.admission import AdmissionConfig
from router.config import RouterConfig
from router.full_policy import RaylanePolicy
from router.registry import DEFAULT_POLICY

TREE = {
    "policy": "raylane",
    "raylane": {"prefix_weight": 3.0, "laps": {"quantile": 0.6}, "prefix": {"max_load_gap": 1.0}},
    "admission": {"enabled": True, "headroom": 1.2, "max_queued_per_tenant": 5},
    "failover": {"max_failovers": 1},
    "tiers": {"target_large_share": 0.3},
    "predictor": {"prior_median_tokens": 64.0, "backoff": [["deployment"], []]},
    "auth_limit": {"max_failures": 4, "window_s": 15.0},
    "http_limits": {"max_body_bytes": 1024},
    "stats_refresh_s": 0.2,
}


def test_defaults_use_the_registrys_default_policy_and_round_trip():
    config = RouterConfig()
    assert config.policy == DEFAULT_POLICY and not config.admission.enabled
    assert RouterConfig.from_dict(config.to_dict()) == config
    assert RouterConfig.from_dict({}) == config


def test_a_nested_tree_round_trips_through_yaml_text():
    config = RouterConfig.from_dict(TREE)
    assert config.raylane.laps.quantile == 0.6 and config.predictor.backoff == (("deployment",), ())
    assert config.admission == AdmissionConfig(enabled=True, headroom=1.2, max_queued_per_tenant=5)
    assert RouterConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"admission": {"headroom": 3}}, "router.admission.headroom: headroom must be in (0, 2]"),
        ({"admission": {"enabled": "yes"}}, "router.admission.enabled: must be true or false, got 'yes'"),
        ({"raylane": {"laps": {"split": "median"}}}, "router.raylane.laps.split: must be one of 'quantile'"),
        ({"raylane": {"prefix_weight": -1}}, "router.raylane.prefix_weight: prefix_weight must be finite and >= 0"),
        ({"failover": 3}, "router.failover: must be a mapping, got int"),
        ({"port": "50051"}, "router.port: must be an integer, got '50051'"),
        ({"policy": "smartest"}, "router.policy: unknown routing policy 'smartest'"),
        ({"admision": {}}, "router.admision: unknown key; did you mean 'admission'? known: host, port, "),
        (
            {"admission": {"headrom": 1}},
            "router.admission.headrom: unknown key; did you mean 'headroom'? known: enabled, headroom",
        ),
        (
            {"admission_headroom": 0.9},
            "router.admission_headroom: this key moved; write it as router.admission.headroom",
        ),
        ({"max_failovers": 2}, "router.max_failovers: this key moved; write it as router.failover.max_failovers"),
    ],
)
def test_bad_values_and_keys_name_their_key_path(data, message):
    with pytest.raises(ValueError) as info:
        RouterConfig.from_dict(data)
    assert str(info.value).startswith(message), str(info.value)


def test_a_router_file_or_a_cluster_files_router_section(tmp_path):
    router_file = tmp_path / "router.yaml"
    router_file.write_text(yaml.safe_dump(TREE))
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({"admin_port": 1, "router": TREE}))
    assert RouterConfig.from_yaml_file(router_file) == RouterConfig.from_yaml_file(cluster_file)
    cluster_file.write_text("router:\n  admission: {headroom: 9}\n")
    with pytest.raises(ValueError, match=r"router\.admission\.headroom"):
        RouterConfig.from_yaml_file(cluster_file)


def test_the_replica_builds_every_part_from_the_tree():
    from router.server import RouterReplica

    config = RouterConfig.from_dict({**TREE, "port": 0, "metrics_port": 0, "http_port": 0})
    replica = RouterReplica(config, control_plane=None)
    core = replica.core
    assert isinstance(core.policy, RaylanePolicy) and core.policy.config == config.raylane
    assert core.admission is not None and core.admission.config is config.admission
    assert core.failover is config.failover and core.tier_config is config.tiers
    assert core.predictor.config is config.predictor
    assert replica.auth_limit.config is config.auth_limit
    off = RouterReplica(RouterConfig(policy="least_loaded", port=0, metrics_port=0, http_port=0), control_plane=None)
    assert off.core.admission is None and off.core.policy.name == "least_loaded"


def test_an_empty_yaml_section_means_its_defaults():
    config = RouterConfig.from_dict(yaml.safe_load("admission:\nfailover:\n"))
    assert config.admission == AdmissionConfig() and config == RouterConfig()

"""ControlPlaneConfig: defaults < `RAYLANE_*` environment < YAML file < explicit overrides, and validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from control_plane.config import DEFAULT_STATE_DIR, ENV_PREFIX, ControlPlaneConfig
from router.config import RouterConfig


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No `RAYLANE_*` variable from the machine leaks into a test."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_load_without_sources_gives_the_defaults():
    assert ControlPlaneConfig.load() == ControlPlaneConfig()
    assert ControlPlaneConfig().state_dir == str(Path(DEFAULT_STATE_DIR).expanduser())


def test_state_dir_is_made_absolute_where_the_config_is_built(tmp_path, monkeypatch):
    # The control plane actor runs in another directory; a relative path must not follow it there.
    monkeypatch.chdir(tmp_path)
    assert ControlPlaneConfig(state_dir="state").state_dir == str(tmp_path / "state")


def test_environment_variables_are_parsed_to_the_field_types(monkeypatch):
    monkeypatch.setenv("RAYLANE_ADMIN_PORT", "6000")
    monkeypatch.setenv("RAYLANE_RECONCILE_INTERVAL_S", "0.25")
    monkeypatch.setenv("RAYLANE_REDIS_URL", "redis://db:6379/1")
    monkeypatch.setenv("RAYLANE_NUM_ROUTERS", "3")
    config = ControlPlaneConfig.load()
    assert (config.admin_port, config.reconcile_interval_s) == (6000, 0.25)
    assert (config.redis_url, config.num_routers) == ("redis://db:6379/1", 3)


def test_yaml_file_beats_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLANE_ADMIN_PORT", "6000")
    monkeypatch.setenv("RAYLANE_ROUTER__PORT", "6001")
    monkeypatch.setenv("RAYLANE_ROUTER__POLICY", "p2c")
    path = write_yaml(tmp_path, "admin_port: 7000\nstate_dir: /srv/raylane\nrouter: {policy: least_loaded}\n")
    config = ControlPlaneConfig.load(path)
    assert (config.admin_port, config.router.port, config.state_dir) == (7000, 6001, "/srv/raylane")
    assert config.router.policy == "least_loaded"  # a file's section merges key by key over the environment


def test_overrides_beat_the_yaml_file_and_none_overrides_are_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLANE_NUM_ROUTERS", "2")
    path = write_yaml(tmp_path, "admin_port: 7000\nrouter:\n  port: 7001\n  http_port: 7002\n")
    config = ControlPlaneConfig.load(path, admin_port=8000, redis_url=None, router={"port": 7100})
    assert (config.admin_port, config.router.port, config.num_routers) == (8000, 7100, 2)
    assert config.router.http_port == 7002


def test_an_empty_yaml_file_changes_nothing(tmp_path):
    assert ControlPlaneConfig.load(write_yaml(tmp_path, "")) == ControlPlaneConfig()


def test_state_path_expands_the_home_directory():
    assert ControlPlaneConfig(state_dir="~/x").state_path == Path("~/x").expanduser()


@pytest.mark.parametrize("port", [-1, 65536, "50050", 50050.0, True])
def test_a_bad_port_is_a_value_error_naming_the_field(port):
    with pytest.raises(ValueError, match="admin_port"):
        ControlPlaneConfig(admin_port=port)
    with pytest.raises(ValueError, match=r"router\.port"):
        ControlPlaneConfig.load(router={"port": port})


def test_a_bad_port_from_yaml_is_a_value_error_naming_the_file_and_key_path(tmp_path):
    path = write_yaml(tmp_path, "router:\n  port: 70000\n")
    with pytest.raises(ValueError, match=f"{path}: router.port: port must be an integer in"):
        ControlPlaneConfig.load(path)


def test_a_non_numeric_port_in_the_environment_is_a_value_error(monkeypatch):
    monkeypatch.setenv("RAYLANE_ADMIN_PORT", "fifty")
    with pytest.raises(ValueError, match="RAYLANE_ADMIN_PORT='fifty' is not an integer"):
        ControlPlaneConfig.load()


def test_an_unknown_yaml_key_is_a_value_error_naming_it(tmp_path):
    path = write_yaml(tmp_path, "admin_port: 7000\nadmin_prot: 7001\n")
    with pytest.raises(ValueError, match="admin_prot: unknown key; did you mean 'admin_port'\\? known: state_dir, "):
        ControlPlaneConfig.load(path)


def test_a_yaml_file_that_is_not_a_mapping_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="YAML mapping"):
        ControlPlaneConfig.load(write_yaml(tmp_path, "- admin_port\n- 7000\n"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_routers", -1), ("num_routers", 1.5), ("num_routers", True), ("reconcile_interval_s", 0.0)],
)
def test_other_bad_values_are_value_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ControlPlaneConfig(**{field: value})


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("router_policy: raylane", "router.policy"),
        ("router_admission: true", "router.admission.enabled"),
        ("router_max_failovers: 2", "router.failover.max_failovers"),
        ("router_port: 1", "router.port"),
        ("router_http_port: 1", "router.http_port"),
        ("router_metrics_port: 1", "router.metrics_port"),
        ("router_host: 0.0.0.0", "router.host"),
        ("auth_max_failures: 3", "auth_limit.max_failures"),
    ],
)
def test_an_old_flat_key_names_its_new_nested_key(tmp_path, old, new):
    with pytest.raises(ValueError, match=f"this key moved; write it as {new}"):
        ControlPlaneConfig.load(write_yaml(tmp_path, old + "\n"))


def test_an_old_environment_variable_names_its_new_form(monkeypatch):
    monkeypatch.setenv("RAYLANE_ROUTER_POLICY", "p2c")
    with pytest.raises(ValueError, match="RAYLANE_ROUTER_POLICY is gone: set RAYLANE_ROUTER__POLICY"):
        ControlPlaneConfig.load()


def test_nested_environment_variables_reach_every_section(monkeypatch):
    monkeypatch.setenv("RAYLANE_ROUTER__ADMISSION__ENABLED", "true")
    monkeypatch.setenv("RAYLANE_ROUTER__ADMISSION__HEADROOM", "0.8")
    monkeypatch.setenv("RAYLANE_ROUTER__RAYLANE__LAPS__QUANTILE", "0.6")
    router = ControlPlaneConfig.load().router
    assert (router.admission.enabled, router.admission.headroom, router.raylane.laps.quantile) == (True, 0.8, 0.6)
    monkeypatch.setenv("RAYLANE_ROUTER__ADMISSION__ENABLED", "maybe")
    with pytest.raises(ValueError, match="RAYLANE_ROUTER__ADMISSION__ENABLED='maybe' is not true or false"):
        ControlPlaneConfig.load()


def test_the_whole_tree_round_trips_through_yaml(tmp_path):
    config = ControlPlaneConfig.from_dict(
        {
            "state_dir": str(tmp_path),
            "num_routers": 2,
            "auth_limit": {"max_failures": 3},
            "router": {
                "policy": "p2c",
                "admission": {"enabled": True, "headroom": 1.1},
                "failover": {"max_failovers": 1},
                "raylane": {"prefix_weight": 3.0, "prefix": {"max_load_gap": 1.0}},
                "predictor": {"backoff": [["deployment"], []]},
            },
        }
    )
    path = write_yaml(tmp_path, yaml.safe_dump(config.to_dict()))
    assert ControlPlaneConfig.load(path) == config
    assert config.router.predictor.backoff == (("deployment",), ())


def test_replica_configs_offset_every_port_and_carry_the_top_level_tls():
    config = ControlPlaneConfig(router=RouterConfig(port=6000, http_port=-1, metrics_port=7000))
    replica = config.router_config(2)
    assert (replica.port, replica.http_port, replica.metrics_port) == (6002, -1, 7002)
    assert replica.policy == config.router.policy and replica.admission == config.router.admission
    assert ControlPlaneConfig(router=RouterConfig(port=0)).router_config(3).port == 0
    with pytest.raises(ValueError, match="set tls_cert_file and tls_key_file at the top level"):
        ControlPlaneConfig.from_dict({"router": {"tls_cert_file": __file__, "tls_key_file": __file__}})


def test_the_control_plane_and_router_serve_default_to_the_registry_policy():
    from control_plane.cli_router import resolve_config
    from router.registry import DEFAULT_POLICY

    actor_router = ControlPlaneConfig().router_config(0)
    served = resolve_config(None, {}, None)
    assert actor_router.policy == served.policy == DEFAULT_POLICY == "raylane"
    assert type(actor_router.make_policy()) is type(served.make_policy())

"""ControlPlaneConfig: defaults < `RAYLANE_*` environment < YAML file < explicit overrides, and validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from control_plane.config import DEFAULT_STATE_DIR, ENV_PREFIX, ControlPlaneConfig


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No `RAYLANE_<FIELD>` variable from the machine leaks into a test."""
    for f in dataclasses.fields(ControlPlaneConfig):
        monkeypatch.delenv(ENV_PREFIX + f.name.upper(), raising=False)


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
    monkeypatch.setenv("RAYLANE_ROUTER_PORT", "6001")
    path = write_yaml(tmp_path, "admin_port: 7000\nstate_dir: /srv/raylane\n")
    config = ControlPlaneConfig.load(path)
    assert (config.admin_port, config.router_port, config.state_dir) == (7000, 6001, "/srv/raylane")


def test_overrides_beat_the_yaml_file_and_none_overrides_are_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLANE_NUM_ROUTERS", "2")
    path = write_yaml(tmp_path, "admin_port: 7000\nrouter_port: 7001\n")
    config = ControlPlaneConfig.load(path, admin_port=8000, router_port=None)
    assert (config.admin_port, config.router_port, config.num_routers) == (8000, 7001, 2)


def test_an_empty_yaml_file_changes_nothing(tmp_path):
    assert ControlPlaneConfig.load(write_yaml(tmp_path, "")) == ControlPlaneConfig()


def test_state_path_expands_the_home_directory():
    assert ControlPlaneConfig(state_dir="~/x").state_path == Path("~/x").expanduser()


@pytest.mark.parametrize("port", [-1, 65536, "50050", 50050.0, True])
def test_a_bad_port_is_a_value_error_naming_the_field(port):
    with pytest.raises(ValueError, match="admin_port"):
        ControlPlaneConfig(admin_port=port)
    with pytest.raises(ValueError, match="router_port"):
        ControlPlaneConfig.load(router_port=port)


def test_a_bad_port_from_yaml_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="router_port"):
        ControlPlaneConfig.load(write_yaml(tmp_path, "router_port: 70000\n"))


def test_a_non_numeric_port_in_the_environment_is_a_value_error(monkeypatch):
    monkeypatch.setenv("RAYLANE_ADMIN_PORT", "fifty")
    with pytest.raises(ValueError, match="RAYLANE_ADMIN_PORT='fifty' is not a number"):
        ControlPlaneConfig.load()


def test_an_unknown_yaml_key_is_a_value_error_naming_it(tmp_path):
    path = write_yaml(tmp_path, "admin_port: 7000\nadmin_prot: 7001\n")
    with pytest.raises(ValueError, match="unknown key 'admin_prot'"):
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

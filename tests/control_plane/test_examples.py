"""The example files the README points at stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.config import ControlPlaneConfig
from control_plane.spec import DeploymentSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["chat.yaml", "moe.yaml"])
def test_example_deployments_parse(name):
    spec = DeploymentSpec.from_yaml((EXAMPLES / name).read_text())
    assert spec.name == name.removesuffix(".yaml")
    assert spec.pools


def test_chat_example_is_disaggregated():
    assert DeploymentSpec.from_yaml((EXAMPLES / "chat.yaml").read_text()).is_disaggregated


def test_example_cluster_config_loads_and_states_the_defaults():
    config = ControlPlaneConfig.load(EXAMPLES / "cluster.yaml")
    assert (config.admin_port, config.router.port, config.num_routers) == (50050, 50051, 1)
    assert config.router.policy == ControlPlaneConfig().router.policy and not config.router.admission.enabled


def test_router_serve_reads_the_example_cluster_files_router_section():
    from router.config import RouterConfig

    assert (
        RouterConfig.from_yaml_file(EXAMPLES / "cluster.yaml")
        == ControlPlaneConfig.load(EXAMPLES / "cluster.yaml").router
    )

"""The chart's router settings: one `router:` section of the cluster ConfigMap, for router pods and control plane."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_support import CHART, EXAMPLES, REPO, run_helm

from control_plane.cli_router import resolve_config
from control_plane.config import ControlPlaneConfig
from router.config import RouterConfig
from router.registry import DEFAULT_POLICY

FULLNAME = "rl-raylane"


def _load_schema_script():
    spec = importlib.util.spec_from_file_location("router_schema", REPO / "ci" / "router_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cluster_yaml(objects: list[dict[str, Any]], tmp_path: Path) -> Path:
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{FULLNAME}-cluster"]
    path = tmp_path / "cluster.yaml"
    path.write_text(configmap["data"]["cluster.yaml"])
    return path


def _router_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (router,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == f"{FULLNAME}-router"]
    return router["spec"]["template"]["spec"]


def _serve_flags(objects: list[dict[str, Any]]) -> dict[str, str]:
    container = _router_pod(objects)["containers"][0]
    argv = shlex.split(" ".join(container["command"][2:] + container["args"]))
    argv = argv[argv.index("serve") + 1 :]
    return dict(zip(argv[::2], argv[1::2], strict=False))


def _as_router_serve_resolves_it(objects: list[dict[str, Any]], path: Path) -> RouterConfig:
    """What `raylane router serve` in a router pod runs: the mounted file, with the pod's flags on top."""
    flags = _serve_flags(objects)
    given = {
        "host": flags.get("--host"),
        "port": int(flags["--port"]) if "--port" in flags else None,
        "http_port": int(flags["--http-port"]) if "--http-port" in flags else None,
        "metrics_port": int(flags["--metrics-port"]) if "--metrics-port" in flags else None,
        "tls_cert_file": flags.get("--tls-cert"),
        "tls_key_file": flags.get("--tls-key"),
    }
    return resolve_config(path, given, None)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("RAYLANE_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("values", [None, "h100-pd.yaml"])
def test_router_pods_and_control_plane_read_one_router_section(render, tmp_path, values):
    objects = render(EXAMPLES / values if values else None)
    path = _cluster_yaml(objects, tmp_path)
    from_file = RouterConfig.from_yaml_file(path)
    # The control plane's view of the same file (its routers, were it to start them) and the pods' agree.
    assert ControlPlaneConfig.load(path).router == from_file
    assert _as_router_serve_resolves_it(objects, path) == from_file  # the pods' flags only restate the file
    assert from_file.policy == DEFAULT_POLICY
    pod = _router_pod(objects)
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/raylane/cluster.yaml"]]["configMap"]["name"] == f"{FULLNAME}-cluster"
    assert _serve_flags(objects)["--config"] == "/etc/raylane/cluster.yaml"
    if values == "h100-pd.yaml":
        assert from_file.admission.enabled and from_file.admission.max_queued_per_tenant == 128
        assert from_file.failover.max_failovers == 2


def test_router_config_values_reach_every_router(render, tmp_path):
    objects = render(
        None,
        "router.config.policy=p2c",
        "router.config.admission.enabled=true",
        "router.config.raylane.prefix_weight=3",
        "router.http.enabled=false",
        "tls.existingSecret=raylane-tls",
    )
    config = _as_router_serve_resolves_it(objects, _cluster_yaml(objects, tmp_path))
    assert (config.policy, config.admission.enabled, config.raylane.prefix_weight) == ("p2c", True, 3.0)
    assert (config.host, config.port, config.http_port, config.metrics_port) == ("0.0.0.0", 50051, 0, 9091)
    assert config.tls_cert_file == "/etc/raylane/tls/tls.crt"
    assert RouterConfig.from_yaml_file(_cluster_yaml(objects, tmp_path)) == config


@pytest.mark.parametrize(
    ("set_arg", "message"),
    [
        ("router.config.admision.enabled=true", "additional properties 'admision' not allowed"),
        ("router.config.port=1", "additional properties 'port' not allowed"),  # the chart owns the ports
        ("router.config.admission.headroom=high", "got string, want number"),
        ("router.config.raylane.laps.split=median", "value must be one of 'quantile', 'token_balance'"),
        ("controlPlane.extraConfig.router.policy=p2c", "invalid propertyName 'router'"),
    ],
)
def test_bad_router_values_fail_schema_validation(helm, chart_copy, set_arg, message):
    result = run_helm(helm, "template", "rl", str(chart_copy), "--set", set_arg)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_the_chart_schema_is_generated_from_router_config():
    """values.schema.json's router.config is RouterConfig's tree; `python ci/router_schema.py` rewrites it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["router"]["properties"]["config"] == _load_schema_script().router_config_schema(), (
        "helm/raylane/values.schema.json is stale: run `python ci/router_schema.py`"
    )


def test_router_config_to_dict_fits_the_chart_schema():
    """Every key `RouterConfig` writes (but the chart's own) is one the chart's values accept."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["router"]["properties"]["config"]
    owned = _load_schema_script().CHART_OWNED
    data = {k: v for k, v in RouterConfig().to_dict().items() if k not in owned}

    def keys(node: dict[str, Any], value: Any, path: str) -> None:
        if isinstance(value, dict):
            assert set(value) <= set(node["properties"]), path
            for key, item in value.items():
                keys(node["properties"][key], item, f"{path}.{key}")

    keys(schema, data, "router.config")
    assert yaml.safe_load(yaml.safe_dump(data)) == data

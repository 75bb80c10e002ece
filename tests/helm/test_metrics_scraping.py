"""The chart's ServiceMonitor scrapes raylane's own metrics where the processes serve them, and its NetworkPolicies
let the scrapers (networkPolicy.metricsFrom) in, and nobody else. Rendered with the real `helm template`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
from helm_support import EXAMPLES, RELEASE, pod_templates
from manifest_validation import validate

from control_plane.config import ControlPlaneConfig

FULLNAME = f"{RELEASE}-raylane"
ROUTER_POD = f"Deployment/{FULLNAME}-router"
SCRAPER = {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
"""The peer networkPolicy.metricsFrom names in these renders (Prometheus' namespace)."""
STRANGER = {"namespaceSelector": {"matchLabels": {"name": "elsewhere"}}}
"""A peer nothing names."""
WITH_SCRAPER = (
    "metrics.serviceMonitor.enabled=true",
    "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
    "networkPolicy.routerFrom[0].namespaceSelector.matchLabels.name=clients",
)
CONFIGS: dict[str, tuple[Path | None, tuple[str, ...]]] = {
    "http": (None, ()),
    "http-off": (None, ("router.http.enabled=false",)),
    "tls": (None, ("tls.existingSecret=raylane-tls",)),
    "other-ports": (None, ("router.http.port=8081", "controlPlane.metricsPort=9100", "router.metricsPort=9200")),
    "http-off-other-port": (None, ("router.http.enabled=false", "router.metricsPort=9200")),
    "h100-pd": (EXAMPLES / "h100-pd.yaml", ()),
    "multitenant-lora": (EXAMPLES / "multitenant-lora.yaml", ()),
}


def render_config(render, name: str) -> list[dict[str, Any]]:
    values, set_args = CONFIGS[name]
    return render(values, *WITH_SCRAPER, *set_args)


def scrape_targets(objects: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """ServiceMonitor endpoint (its port name) -> {pod template: the container port Prometheus scrapes on it}."""
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    wanted = monitor["spec"]["selector"]["matchLabels"]
    services = [o for o in objects if o["kind"] == "Service" and wanted.items() <= o["metadata"]["labels"].items()]
    templates = pod_templates(objects)
    targets: dict[str, dict[str, int]] = {}
    for endpoint in monitor["spec"]["endpoints"]:
        found = targets.setdefault(endpoint["port"], {})
        for service in services:
            selector = service["spec"]["selector"]
            for port in service["spec"]["ports"]:
                if port["name"] != endpoint["port"]:
                    continue
                pods = {n: t for n, t in templates.items() if selector.items() <= t["metadata"]["labels"].items()}
                assert pods, f"Service {service['metadata']['name']} selects no pod"
                for pod, template in pods.items():
                    found[pod] = _container_port(template, port.get("targetPort", port["port"]), pod)
        assert found, f"endpoint port {endpoint['port']!r} is on none of the Services the ServiceMonitor selects"
    return targets


def _container_port(template: dict[str, Any], target: int | str, pod: str) -> int:
    declared = {p.get("name"): p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    if isinstance(target, str):
        assert target in declared, f"{pod} has no container port named {target!r} (it has {declared})"
        return declared[target]
    assert target in declared.values(), f"{pod} declares no container port {target}"
    return target


def admits(objects: list[dict[str, Any]], pod_labels: dict[str, str], port: int, peer: dict[str, Any]) -> bool:
    """Whether the NetworkPolicies let `peer` reach `port` of a pod with `pod_labels` (a peer is admitted by a rule
    that names it, or that names no peer at all)."""
    selecting = [
        o["spec"]
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and "Ingress" in o["spec"].get("policyTypes", ["Ingress"])
        and o["spec"]["podSelector"].get("matchLabels", {}).items() <= pod_labels.items()
    ]
    if not selecting:
        return True  # a pod no policy selects is not isolated
    for spec in selecting:
        for rule in spec.get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            if not rule.get("from") or peer in rule["from"]:
                return True
    return False


def router_serve_argv(objects: list[dict[str, Any]]) -> list[str]:
    (router,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == f"{FULLNAME}-router"]
    container = router["spec"]["template"]["spec"]["containers"][0]
    command = shlex.split(" ".join(container["command"][2:] + container["args"]))
    return command[command.index("raylane") :]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_service_monitor_scrapes_raylane_where_routers_and_control_plane_serve_it(render, name, tmp_path):
    objects = render_config(render, name)
    targets = scrape_targets(objects)
    templates = pod_templates(objects)
    ray_nodes = {n for n, t in templates.items() if t["metadata"]["labels"].get("raylane.io/ray-node") == "true"}
    assert targets["metrics"] == dict.fromkeys(ray_nodes, 8080)  # Ray's own, kept
    assert set(targets["raylane-metrics"]) == {ROUTER_POD, "ray-head"}

    # The router pods serve /metrics on the scraped port: the HTTP front when it speaks plain HTTP, else --metrics-port.
    argv = router_serve_argv(objects)
    router_port = targets["raylane-metrics"][ROUTER_POD]
    flag = "--http-port" if argv[argv.index("--metrics-port") + 1] == "0" else "--metrics-port"
    served = int(argv[argv.index(flag) + 1])
    assert served == router_port, f"routers serve /metrics on {flag} {served}, Prometheus scrapes {router_port}"
    # A dedicated port only where the HTTP front cannot be scraped in plain HTTP (off, or TLS only), and vice versa.
    http_unscrapable = argv[argv.index("--http-port") + 1] == "0" or "--tls-cert" in argv
    assert (flag == "--metrics-port") == http_unscrapable
    assert argv[argv.index("--host") + 1] == "0.0.0.0"

    # The control plane (`raylane up` on the head) serves its own on metrics_port of the cluster config, on admin_host.
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{FULLNAME}-cluster"]
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text(configmap["data"]["cluster.yaml"])
    config = ControlPlaneConfig.load(cluster_yaml)
    head_port = targets["raylane-metrics"]["ray-head"]
    assert config.metrics_port == head_port, (
        f"the control plane serves {config.metrics_port}, Prometheus scrapes {head_port}"
    )
    assert config.admin_host == "0.0.0.0"
    head = templates["ray-head"]["spec"]["containers"][0]
    assert "exec raylane up" in head["lifecycle"]["postStart"]["exec"]["command"][-1]

    # Every new Service and port is a valid object (names fit in 63 characters, ports are named and in range).
    errors = [e for o in objects if o["kind"] in ("Service", "NetworkPolicy", "ServiceMonitor") for e in validate(o)]
    assert not errors, errors


@pytest.mark.parametrize("name", CONFIGS)
def test_network_policies_admit_the_scrapers_to_every_scraped_port_and_strangers_to_none(render, name):
    objects = render_config(render, name)
    templates = pod_templates(objects)
    for endpoint, pods in scrape_targets(objects).items():
        for pod, port in pods.items():
            labels = templates[pod]["metadata"]["labels"]
            assert admits(objects, labels, port, SCRAPER), f"{endpoint}: {pod}:{port} refuses the scraper"
            assert not admits(objects, labels, port, STRANGER), f"{endpoint}: {pod}:{port} admits a stranger"


def test_without_the_service_monitor_no_metrics_service_or_policy_is_rendered(render):
    objects = render(None, "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring")
    assert not [o for o in objects if o["kind"] in ("Service", "NetworkPolicy") and "metrics" in o["metadata"]["name"]]
    argv = router_serve_argv(objects)
    assert argv[argv.index("--metrics-port") + 1] == "0"  # /metrics is on the HTTP port; no second listener


def test_the_longest_release_name_still_gives_valid_object_names(render):
    objects = render(None, "metrics.serviceMonitor.enabled=true", f"fullnameOverride={'r' * 50}")
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    assert f"{'r' * 48}-router-metrics" in services and f"{'r' * 41}-control-plane-metrics" in services
    errors = {f"{o['kind']}/{o['metadata']['name']}": validate(o) for o in objects}
    assert not {k: v for k, v in errors.items() if v}, errors
